"""Clip shards: pre-extracted clips in Parquet, one row per clip ("frames": list of JPEG bytes, "key").

`raysl data shard VIDEOS DST --clips` writes them (`EncodeClips` encodes decoded clips; raysl/data/shard.py drives
it). `is_clip_shards` tells such a listing from an image corpus; `read_clip_shards` reads it to the rows
`raysl.data.video.read_clips` makes: {"frames": uint8 (T, h, w, 3), "key", "ok"}. Decoding JPEGs costs far less
than decoding video (no GOP to decode through), so a corpus read many times pays for its shards.
Imports no torch: these run in Ray tasks, whose start-up would pay for it.
"""

from __future__ import annotations

import io
import logging
import posixpath
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
from PIL import Image

from raysl.data.sources import Listing, _read_parquet_v1
from raysl.data.video_decode import fs_path, stack
from raysl.storage import S3Settings, StorageError, is_s3, redact, resolve

log = logging.getLogger(__name__)

JPEG_QUALITY = 90
CLIPS_PER_BATCH = 8  # clips decoded at a time in a read task: its memory is a few clips' frames


class EncodeClips:
    """Decoded clips → Parquet rows {"frames": list of JPEG bytes, "key": path relative to the source#start};
    bad clips are dropped and tallied."""

    def __init__(self, root: str, ledger: Any) -> None:
        self.root, self.ledger = root, ledger

    def _key(self, clip: str) -> str:
        file, _, start = clip.rpartition("#")
        rel = posixpath.relpath(file, self.root) if file != self.root else posixpath.basename(file)
        return f"{rel}#{start}"

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        frames: list[list[bytes]] = []
        keys: list[str] = []
        bad: list[str] = []
        for clip, key, ok in zip(batch["frames"], batch["key"], batch["ok"], strict=True):
            if not ok:
                bad.append(f"{self._key(str(key))}: a frame does not decode")
                continue
            jpegs = []
            for frame in clip:
                buf = io.BytesIO()
                Image.fromarray(np.ascontiguousarray(frame)).save(buf, "JPEG", quality=JPEG_QUALITY)
                jpegs.append(buf.getvalue())
            frames.append(jpegs)
            keys.append(self._key(str(key)))
        ray.get(self.ledger.add.remote(len(keys), sum(len(b) for f in frames for b in f), bad))
        return pa.table({"frames": pa.array(frames, type=pa.list_(pa.binary())), "key": pa.array(keys, pa.string())})


def _is_jpeg_list(t: pa.DataType) -> bool:
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        return False
    v = t.value_type
    return bool(pa.types.is_binary(v) or pa.types.is_large_binary(v))


def is_clip_shards(listing: Listing, s3: S3Settings | None = None) -> bool:
    """Whether a listing is clip shards: Parquet whose (first file's) schema has a list-of-binary "frames"."""
    if listing.fmt != "parquet" or not listing.files:
        return False
    if listing.schemas is not None:
        schema = listing.schemas[0]
    else:
        fs, _ = resolve(listing.uri, s3 or S3Settings.resolve())
        schema = pq.read_schema(listing.files[0], filesystem=fs)
    return "frames" in schema.names and _is_jpeg_list(schema.field("frames").type)


def _jpeg_clip(frames: Any) -> np.ndarray | None:
    """A clip's JPEG frames → uint8 (T, h, w, 3); None when one does not decode or the shapes differ."""
    try:
        arrays = [np.asarray(Image.open(io.BytesIO(bytes(b))).convert("RGB")) for b in frames]
    except (OSError, ValueError, TypeError, Image.DecompressionBombError):
        return None
    if not arrays or any(a.shape != arrays[0].shape for a in arrays):
        return None
    return np.stack(arrays)


def _decode_shard_rows(batch: dict[str, np.ndarray], per_batch: int) -> Iterator[dict[str, np.ndarray]]:
    for i in range(0, len(batch["key"]), per_batch):
        keys = [str(k) for k in batch["key"][i:i + per_batch]]
        raw = batch["frames"][i:i + per_batch]
        clips = [_jpeg_clip(f if f is not None else []) for f in raw]
        good = next((c.shape for c in clips if c is not None), None)
        out = []
        for key, clip, f in zip(keys, clips, raw, strict=True):
            if clip is None:
                log.warning("clip %s of a clip shard does not decode; marked bad", redact(key))
                t = len(f) if f is not None else 0
                clip = np.zeros((t, *(good[1:] if good else (8, 8, 3))), np.uint8)
            out.append(clip)
        yield {"frames": stack(out), "key": np.array(keys, dtype=object),
               "ok": np.array([c is not None for c in clips], dtype=bool)}


def read_clip_shards(files: list[str], uri: str, s3: S3Settings | None, *,
                     per_task: int = CLIPS_PER_BATCH) -> ray.data.Dataset:
    """Clip shards (Parquet: "frames" list of JPEG bytes, "key") → the rows of `read_clips`: {"frames": uint8
    (T, h, w, 3), "key", "ok"}, in file order. A clip with a frame that does not decode is zeros and ok=False."""
    if not files:
        raise StorageError(f"no clip shards given to read from {redact(uri)!r}")
    fs, _ = resolve(uri, s3 or S3Settings.resolve())
    paths = [fs_path(f) for f in files]
    if not is_s3(uri):
        paths = [f if f.startswith("/") else resolve(f)[1] for f in paths]
    ds = _read_parquet_v1(paths, fs, None).select_columns(["frames", "key"])
    ds = ds.map_batches(_decode_shard_rows, fn_kwargs={"per_batch": per_task},  # type: ignore[arg-type]
                        batch_size=None, batch_format="numpy")
    ds.context.execution_options.preserve_order = True
    return ds
