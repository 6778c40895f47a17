"""`raysl data shard`: an image folder (local or s3://) → WebDataset tar shards or Parquet, in parallel.

Every file is test-decoded on Ray Data workers; bad ones are skipped and tallied by a small ledger actor,
and a manifest.json (count, bytes, bad files with examples, shard names) is written beside the shards.
Class sub-folders, when there are several, become labels (`cls` member / `label` column). With a
captions file (CSV with `file,caption` columns, or JSONL of {"file": …, "caption": …}; `file` relative to
SRC or a bare file name) the shards are image-text data: a `txt` member / `caption` column. An image
without a caption, or with an empty one, is skipped and counted like an undecodable one.

With `--clips` the source is a folder of videos and the shards hold clips (raysl.data.video): one Parquet row
per clip, "frames" a list of JPEG bytes (one per frame, decoded at the clip's frame size) and "key"
(`<video path relative to SRC>#<start frame>`); clips with a frame that does not decode are skipped and counted.

A destination that already holds objects is refused (a rerun would add a second copy of every sample, and the
manifest would count only the new one) unless `overwrite`, which empties it first.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import posixpath
import uuid
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray

from raysl import storage
from raysl.config import MAX_IMAGE_PIXELS
from raysl.data.clip_shards import EncodeClips
from raysl.data.ledger import Ledger
from raysl.data.sources import read_images
from raysl.data.tar_sink import TarShardSink
from raysl.data.views import BadImage, decode_image
from raysl.storage import S3Settings, redact

log = logging.getLogger(__name__)
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "PPM": "ppm"}
SHARD_FORMATS = ("webdataset", "parquet")


def sample_key(rel: str) -> str:
    """A sample's key from its path relative to the source: unique, stable, and valid for WebDataset.

    WebDataset splits a member name at its first dot (key, extension) and a `/` opens a sub-folder, so both
    become `_` in a readable stem; that folding (and dropping the extension) merges `a/b.jpg`, `a_b.png` and
    `a.b.jpg`, so the first 8 hex digits of the full path's SHA-1 follow. Keys then collide only if the stems
    *and* the hashes do: 1 in 4·10⁹ for two paths whose stems fold together, which few paths do.
    """
    stem = posixpath.splitext(rel)[0].replace("/", "_").replace(".", "_")
    return f"{stem}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def claim_destination(uri: str, overwrite: bool, s3: S3Settings | None = None, *,
                      keep: tuple[str, ...] = ()) -> None:
    """Make `uri` (a folder or an S3 prefix) ready to be written: refuse it if it holds objects, or with
    `overwrite` delete them first. `keep`: URIs that must survive (the source): a destination that is one of
    them or holds one is refused even with `overwrite`."""
    fs, path = storage.resolve(uri, s3)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise ValueError(f"destination {redact(uri)!r} is a file, not a folder")
    held = [] if info.type == pafs.FileType.NotFound else fs.get_file_info(
        pafs.FileSelector(path, recursive=True, allow_not_found=True))
    objects = sum(i.type == pafs.FileType.File for i in held)
    if not objects:
        return
    if not overwrite:
        raise ValueError(f"destination {redact(uri)!r} is not empty: it holds {objects} object(s); writing into it "
                         "would mix old and new output. Choose an empty destination, or pass --overwrite to delete "
                         "what is there first")
    for other in keep:
        other_fs, other_path = storage.resolve(other, s3)
        if type(other_fs) is type(fs) and _inside(other_path, path):
            raise ValueError(f"--overwrite would delete {redact(other)!r}: it is inside the destination "
                             f"{redact(uri)!r}")
    if path.strip("/") == "" or (storage.is_s3(uri) and "/" not in path.strip("/")):
        raise ValueError(f"--overwrite refuses to empty {redact(uri)!r}, a whole filesystem or bucket; "
                         "choose a folder or prefix inside it")
    log.warning("--overwrite: deleting %d object(s) under %s", objects, redact(uri))
    fs.delete_dir_contents(path, missing_dir_ok=True)


def read_captions(uri: str, s3: S3Settings | None = None) -> dict[str, str]:
    """CSV (`file`, `caption` columns) or JSONL captions file → {file: caption}."""
    text = storage.read_bytes(uri, s3).decode("utf-8")
    if uri.endswith((".jsonl", ".json")):
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    if rows and not {"file", "caption"} <= set(rows[0]):
        raise ValueError(f"--captions {redact(uri)}: needs `file` and `caption` fields, got {sorted(rows[0])}")
    return {str(r["file"]).strip(): str(r.get("caption") or "") for r in rows}


class Validate:
    def __init__(self, root: str, fmt: str, ledger: Any, labels: bool, max_pixels: int,
                 captions: Any = None) -> None:
        self.root, self.fmt, self.ledger, self.labels, self.max_pixels = root, fmt, ledger, labels, max_pixels
        self._captions_ref, self._captions = captions, None  # an object ref: fetched once per process

    def _caption(self, rel: str) -> str:
        if self._captions is None:
            self._captions = ray.get(self._captions_ref)
        caps: dict[str, str] = self._captions  # type: ignore[assignment]
        return " ".join(str(caps.get(rel, caps.get(os.path.basename(rel), ""))).split())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: list[dict[str, Any]] = []
        bad: list[str] = []
        for data, key, label in zip(batch["image"], batch["key"], batch["label"], strict=True):
            data = bytes(data)
            try:
                fmt = decode_image(data, self.max_pixels).format or ""
                img_format = _EXT.get(fmt)
                if img_format is None:
                    raise BadImage(f"unsupported image format {fmt!r}")
            except BadImage as exc:
                bad.append(f"{key}: {exc}")
                continue
            # root and key are paths on one filesystem (s3 ones without the scheme): relative on both kinds
            rel = posixpath.relpath(str(key), self.root)
            caption = self._caption(rel) if self._captions_ref is not None else ""
            if self._captions_ref is not None and not caption:
                bad.append(f"{key}: no caption")
                continue
            rows.append({"key": sample_key(rel),
                         "data": data, "format": img_format, "label": str(label), "caption": caption})
        # Waited on, so the tally is complete once the write returns.
        ray.get(self.ledger.add.remote(len(rows), sum(len(r["data"]) for r in rows), bad))
        return self._columns(rows)

    def _columns(self, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        if self.fmt == "parquet":
            out = {"image": np.array([r["data"] for r in rows], dtype=object),
                   "key": np.array([r["key"] for r in rows], dtype=object)}
            if self.labels:
                out["label"] = np.array([r["label"] for r in rows], dtype=object)
            if self._captions_ref is not None:
                out["caption"] = np.array([r["caption"] for r in rows], dtype=object)
            return out
        # WebDataset: one column per image extension, None where a sample has another one
        wds = {"__key__": np.array([r["key"] for r in rows], dtype=object)}
        for ext in sorted({r["format"] for r in rows}):
            wds[ext] = np.array([r["data"] if r["format"] == ext else None for r in rows], dtype=object)
        if self.labels:
            wds["cls"] = np.array([r["label"] for r in rows], dtype=object)
        if self._captions_ref is not None:
            wds["txt"] = np.array([r["caption"].encode() for r in rows], dtype=object)
        return wds


def shard(src: str, dst: str, fmt: str, *, rows_per_shard: int = 1000, max_pixels: int = MAX_IMAGE_PIXELS,
          s3: S3Settings | None = None, captions: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Shard the image folder `src` into `dst`, which must be empty (or, with `overwrite`, is emptied first)."""
    if fmt not in SHARD_FORMATS:
        raise ValueError(f"--format: {fmt!r} is not one of {SHARD_FORMATS}")
    s3 = s3 or S3Settings.resolve()
    claim_destination(dst, overwrite, s3, keep=(src,) + ((captions,) if captions else ()))
    files = [f for f in storage.list_files(src, s3) if not f.endswith((".csv", ".jsonl", "manifest.json"))]
    labels = len({os.path.dirname(f) for f in files}) > 1
    _, src_path = storage.resolve(src, s3)
    ledger = Ledger.remote()  # type: ignore[attr-defined]
    # A seeded file order: class folders list one class after another, and shards written in that order would
    # each hold a few classes, which a worker reading its own shards would see as whole epochs of them.
    ds = read_images(src, fmt="images", s3=s3, with_labels=True, shuffle_files=True, shuffle_seed=0)
    caps = ray.put(read_captions(captions, s3)) if captions else None
    ds = ds.map_batches(Validate(src_path, fmt, ledger, labels, max_pixels, caps), batch_size=256,
                        batch_format="numpy")
    fs, dst_path = storage.resolve(dst, s3)
    if not storage.is_s3(dst):
        os.makedirs(dst_path, exist_ok=True)
    if fmt == "parquet":
        ds.write_parquet(dst_path, filesystem=fs, min_rows_per_file=rows_per_shard)
    else:
        ds.write_datasink(TarShardSink(dst_path, filesystem=fs, min_rows_per_file=rows_per_shard,
                                          dataset_uuid=uuid.uuid4().hex))
    manifest = dict(ray.get(ledger.summary.remote()))
    shards = sorted(os.path.basename(f) for f in storage.list_files(dst, s3) if not f.endswith("manifest.json"))
    manifest.update(format=fmt, source=redact(src), labels=labels, captions=bool(captions), shards=shards)
    storage.write_bytes(f"{dst.rstrip('/')}/manifest.json", json.dumps(manifest, indent=2).encode(), s3)
    log.info("sharded %d images (%d bad) from %s into %d %s shard(s) at %s", manifest["count"],
             manifest["bad"], redact(src), len(shards), fmt, redact(dst))
    return manifest


def shard_clips(src: str, dst: str, *, frames_per_clip: int, frame_stride: int, clip_every: int | None,
                frame_side: int, rows_per_shard: int = 256, s3: S3Settings | None = None,
                overwrite: bool = False) -> dict[str, Any]:
    """Cut the videos under `src` into clips and write them to `dst` (empty, or emptied with `overwrite`) as
    Parquet clip shards that raysl.data.video.read_clip_shards reads."""
    from raysl.data.sources import list_source
    from raysl.data.video import plan_clips, read_clips

    s3 = s3 or S3Settings.resolve()
    claim_destination(dst, overwrite, s3, keep=(src,))
    listing = list_source(src, "video", s3)
    every = clip_every or frame_stride
    ids = plan_clips(list(listing.files), src, s3, frames_per_clip, frame_stride, every)
    _, src_path = storage.resolve(src, s3)
    ledger = Ledger.remote()  # type: ignore[attr-defined]
    ds = read_clips(ids, src, s3, frames_per_clip, frame_stride, frame_side)
    ds = ds.map_batches(EncodeClips(src_path, ledger), batch_size=None, batch_format="numpy")
    fs, dst_path = storage.resolve(dst, s3)
    if not storage.is_s3(dst):
        os.makedirs(dst_path, exist_ok=True)
    ds.write_parquet(dst_path, filesystem=fs, min_rows_per_file=rows_per_shard)
    manifest = dict(ray.get(ledger.summary.remote()))
    shards = sorted(os.path.basename(f) for f in storage.list_files(dst, s3) if not f.endswith("manifest.json"))
    manifest.update(format="parquet", source=redact(src), videos=len(listing.files), planned_clips=len(ids),
                    clips={"frames_per_clip": frames_per_clip, "frame_stride": frame_stride, "clip_every": every,
                           "frame_side": frame_side}, shards=shards)
    storage.write_bytes(f"{dst.rstrip('/')}/manifest.json", json.dumps(manifest, indent=2).encode(), s3)
    log.info("sharded %d clips (%d bad) of %d video(s) from %s into %d Parquet shard(s) at %s", manifest["count"],
             manifest["bad"], len(listing.files), redact(src), len(shards), redact(dst))
    return manifest
