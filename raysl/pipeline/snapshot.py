"""A snapshot: the files under the data prefix at one moment (path, size, modification time), written as a
manifest that pretraining then reads instead of the live prefix (`storage.SNAPSHOT_SUFFIX`)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from raysl import storage
from raysl.storage import S3Settings, StorageError, redact


@dataclass(frozen=True)
class Snapshot:
    id: str
    listing_hash: str
    files: list[dict[str, Any]]
    count: int
    bytes: int
    newest_mtime: float

    def manifest(self, prefix: str) -> dict[str, Any]:
        return {"snapshot": self.id, "prefix": redact(prefix), "listing_hash": self.listing_hash,
                "count": self.count, "bytes": self.bytes, "newest_mtime": self.newest_mtime,
                "newest": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.newest_mtime)),
                "taken": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": self.files}


def take(prefix: str, s3: S3Settings | None = None) -> Snapshot:
    """List `prefix` (recursively; hidden and `_` files skipped, as the readers do) into a Snapshot whose id is
    the newest modification time plus a hash of the listing: the same files give the same id."""
    fs, path = storage.resolve(prefix, s3)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except FileNotFoundError:
        raise StorageError(f"data prefix {redact(prefix)!r} does not exist") from None
    except OSError as exc:
        raise StorageError(f"cannot list data prefix {redact(prefix)!r}: {exc}") from None
    files = []
    for i in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        rel = i.path[len(path):].lstrip("/")
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        mtime = i.mtime.timestamp() if i.mtime is not None else 0.0
        files.append({"path": i.path, "size": int(i.size or 0), "mtime": round(mtime, 3)})
    if not files:
        raise StorageError(f"data prefix {redact(prefix)!r} holds no files")
    digest = hashlib.sha256(json.dumps([[f["path"][len(path):], f["size"], f["mtime"]] for f in files]).encode())
    newest = max(f["mtime"] for f in files)
    listing_hash = digest.hexdigest()[:16]
    sid = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(newest))}-{listing_hash[:8]}"
    return Snapshot(sid, listing_hash, files, len(files), sum(f["size"] for f in files), newest)


def write(snap: Snapshot, prefix: str, uri: str, s3: S3Settings | None = None) -> None:
    storage.write_bytes(uri, json.dumps(snap.manifest(prefix), indent=1).encode(), s3)
