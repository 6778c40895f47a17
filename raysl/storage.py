"""URI → pyarrow filesystem. S3 endpoint and region from config or the usual AWS variables.

Keys are read by pyarrow/boto from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, …) and
never pass through raysl's config, logs or MLflow params.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import pyarrow.fs as pafs

_CRED_IN_URL = re.compile(r"(://)[^/@\s]+:[^/@\s]+@")


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def resolve(cls, endpoint_url: str | None = None, region: str | None = None) -> S3Settings:
        return cls(
            endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            region=region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"),
        )


class StorageError(RuntimeError):
    """A URI that matches nothing or cannot be reached; the message carries the URI."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def redact(text: str) -> str:
    """Strip `user:secret@` from URLs so they are safe to log."""
    return _CRED_IN_URL.sub(r"\1***@", text)


def resolve(uri: str, s3: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path without scheme) for a local path or an s3:// URI."""
    if is_s3(uri):
        s3 = s3 or S3Settings.resolve()
        kwargs: dict[str, object] = {}
        if s3.endpoint_url:
            scheme, _, host = s3.endpoint_url.partition("://")
            kwargs["endpoint_override"] = host or scheme
            kwargs["scheme"] = scheme if host else "https"
        if s3.region:
            kwargs["region"] = s3.region
        fs = pafs.S3FileSystem(**kwargs)  # type: ignore[arg-type]
        return fs, uri[len("s3://") :].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


SNAPSHOT_SUFFIX = ".snapshot.json"


def snapshot_files(uri: str, s3: S3Settings | None = None) -> list[str]:
    """The files a snapshot manifest (written by `raysl pipeline`) froze, as filesystem paths: a run on a
    snapshot reads exactly these, whatever lands under the prefix later."""
    try:
        manifest = json.loads(read_bytes(uri, s3))
        return [str(f["path"]) for f in manifest["files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StorageError(f"snapshot manifest {redact(uri)!r} cannot be read: {exc}") from None


def list_files(uri: str, s3: S3Settings | None = None, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """List files under a URI (or the URI itself if it is a file), sorted; fails with the URI named.
    A `*.snapshot.json` URI lists the files its manifest froze."""
    if uri.endswith(SNAPSHOT_SUFFIX):
        files = snapshot_files(uri, s3)
        if suffixes is not None:
            files = [f for f in files if f.lower().endswith(suffixes)]
        if not files:
            raise StorageError(f"snapshot {redact(uri)!r} holds no files")
        return files
    fs, path = resolve(uri, s3)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            files = [path]
        elif info.type == pafs.FileType.Directory:
            sel = pafs.FileSelector(path, recursive=True)
            files = sorted(i.path for i in fs.get_file_info(sel) if i.type == pafs.FileType.File)
        else:
            raise StorageError(f"data URI {redact(uri)!r} matches nothing")
    except StorageError:
        raise
    except Exception as exc:  # pyarrow raises OSError subclasses with the endpoint's reply
        raise StorageError(f"cannot reach data URI {redact(uri)!r}: {exc}") from exc
    base = os.path.basename
    files = [f for f in files if not base(f).startswith((".", "_"))]
    if suffixes is not None:
        files = [f for f in files if f.lower().endswith(suffixes)]
    if not files:
        raise StorageError(f"data URI {redact(uri)!r} holds no files" + (f" ending in {suffixes}" if suffixes else ""))
    return files


def ensure_dir(uri: str, s3: S3Settings | None = None) -> None:
    fs, path = resolve(uri, s3)
    fs.create_dir(path, recursive=True)


def write_bytes(uri: str, data: bytes, s3: S3Settings | None = None) -> None:
    """Write a whole object. Atomic on both kinds: an S3 PUT replaces the object at once, and a local file is
    written beside its target and renamed over it, so a reader (or a crash) never sees half a file."""
    fs, path = resolve(uri, s3)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def read_bytes(uri: str, s3: S3Settings | None = None) -> bytes:
    fs, path = resolve(uri, s3)
    with fs.open_input_stream(path) as f:
        return bytes(f.read())


def exists(uri: str, s3: S3Settings | None = None) -> bool:
    fs, path = resolve(uri, s3)
    return bool(fs.get_file_info(path).type != pafs.FileType.NotFound)
