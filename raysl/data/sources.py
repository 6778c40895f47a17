"""Readers: a URI (local or s3://) → a ray.data.Dataset with an `image` bytes column and a `key`.

Image folders, WebDataset tar shards and Parquet (image bytes, or a HF-style {bytes, path} struct). Video files
are listed here too (format "video"); raysl.data.video reads them as clips.
Labels, when asked for, come from the class sub-folder, a WebDataset `cls` member or a Parquet column.
Captions (image-text data) come from a WebDataset `txt` member or a field of its `json` member, or a
Parquet column; a missing caption becomes '' and is counted as a bad sample downstream.
Every reader lists its files first, so a URI that matches nothing fails before any worker starts; Parquet
files' schemas are all checked (metadata only) so a missing or mistyped column is named before any worker starts.

A listing is made once and passed on: `list_source` returns a `Listing` (the URI, its format, its files) that
`source_columns`, `data_files`, `read_images` and `read_labels` take in place of the URI, so a driver that checks
a source, hands its files to the workers and reads it lists the prefix once (on a bucket of millions of objects
each listing pass is thousands of requests).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data

from raysl.data.tokenizer import caption_text, json_caption
from raysl.storage import S3Settings, StorageError, is_s3, list_files, redact, resolve

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi")
FORMATS = ("images", "webdataset", "parquet", "video")


def detect_format(files: list[str]) -> str:
    # Manifests and notes beside the data do not decide the format.
    low = [f.lower() for f in files if not f.lower().endswith((".json", ".txt", ".md", ".crc"))] or ["?"]
    if all(f.endswith(".parquet") for f in low):
        return "parquet"
    if all(f.endswith(".tar") for f in low):
        return "webdataset"
    if any(f.endswith(IMAGE_SUFFIXES) for f in low):
        return "images"
    if any(f.endswith(VIDEO_SUFFIXES) for f in low):  # beside the videos: masks, subtitles… are not data
        return "video"
    raise StorageError(f"cannot tell the data format of {files[0]!r}…; set data.format to one of {FORMATS}")


def _select(files: list[str], fmt: str) -> list[str]:
    suffix = {"parquet": (".parquet",), "webdataset": (".tar",), "video": VIDEO_SUFFIXES}.get(fmt)
    if suffix is None:  # an image folder: everything, so non-images are counted as bad, not hidden
        # ... except the manifest and captions files that sit beside the images by design
        return [f for f in files if not f.endswith(("manifest.json", ".parquet", ".tar", ".csv", ".jsonl"))]
    return [f for f in files if f.lower().endswith(suffix)]


@dataclass(frozen=True)
class Listing:
    """One listing of a data URI, made once (`list_source`) and passed on instead of listing again: the URI, the
    format of its data and that format's files, sorted, as paths on the URI's filesystem. `schemas`: every
    file's Parquet schema, where they were read along with the listing (`with_schemas`)."""

    uri: str
    fmt: str
    files: tuple[str, ...]
    schemas: tuple[pa.Schema, ...] | None = None

    def __repr__(self) -> str:  # a listing holds up to millions of paths; its repr must not
        return f"Listing({redact(self.uri)!r}, {self.fmt!r}, {len(self.files)} files)"


def list_source(uri: str, fmt: str = "auto", s3: S3Settings | None = None) -> Listing:
    """List `uri` once: its format (detected from the files when `fmt` is "auto") and that format's files. Fails,
    naming the URI (redacted), when it matches nothing or holds no files of the format."""
    fmt, selected = _pick(list_files(uri, s3), fmt, uri)
    return Listing(uri, fmt, tuple(selected))


def _pick(files: list[str], fmt: str, uri: str) -> tuple[str, list[str]]:
    """(format, its files among `files`): the format detected when "auto"; fails naming the URI when none fit."""
    fmt = detect_format(files) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise ValueError(f"data.format: {fmt!r} is not one of {FORMATS}")
    selected = _select(files, fmt)
    if not selected:
        raise StorageError(f"data URI {redact(uri)!r} holds no {fmt} files")
    return fmt, selected


def _listing(source: str | Listing, fmt: str, s3: S3Settings | None) -> Listing:
    """`source` itself if it is a listing (of format `fmt`, unless that is "auto"), else a new listing of it."""
    if isinstance(source, Listing):
        if fmt not in ("auto", source.fmt):
            raise ValueError(f"data.format: {fmt!r}, but {redact(source.uri)!r} was listed as {source.fmt!r}")
        return source
    return list_source(source, fmt, s3)


def with_schemas(listing: Listing, s3: S3Settings | None = None) -> Listing:
    """The listing with every Parquet file's schema read once (footers only), for a caller that reads the same
    Parquet source more than once (its columns, its images, its labels); other formats are returned as they are."""
    if listing.fmt != "parquet" or listing.schemas is not None:
        return listing
    fs, _ = resolve(listing.uri, s3)
    return replace(listing, schemas=tuple(parquet_schemas(list(listing.files), fs)))


def parquet_columns(source: str | Listing, s3: S3Settings | None = None) -> list[str]:
    """The first Parquet file's columns (one footer read; the listing is reused when given)."""
    listing = _listing(source, "parquet", s3)
    if listing.schemas is not None:
        return list(listing.schemas[0].names)
    fs, _ = resolve(listing.uri, s3)
    return list(parquet_schemas([listing.files[0]], fs)[0].names)


def _image_bytes(value: Any) -> bytes:
    """A cell's image bytes; b"" (a bad sample downstream) for anything not bytes-like: `bytes(5)` would be five
    zero bytes and `bytes("x")` a crash."""
    if isinstance(value, dict):  # HF datasets store images as {"bytes": …, "path": …}
        value = value.get("bytes")
    return bytes(value) if isinstance(value, bytes | bytearray | memoryview) else b""


def _is_binary(t: pa.DataType) -> bool:
    return bool(pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t))


def _image_type_ok(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        idx = t.get_field_index("bytes")
        return idx >= 0 and _is_binary(t.field(idx).type)
    return _is_binary(t)


def parquet_schemas(files: list[str], fs: pafs.FileSystem) -> list[pa.Schema]:
    """Every file's schema (a footer read each, in parallel: one round trip per file on S3)."""
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        return list(pool.map(lambda f: pq.read_schema(f, filesystem=fs), files))


def _check_parquet(files: list[str], schemas: tuple[pa.Schema, ...], uri: str, required: dict[str, str],
                   image_column: str) -> None:
    """Fail, naming the file, when a file lacks a required column ({column: its setting's name}) or its image
    column is not image bytes."""
    for f, schema in zip(files, schemas, strict=True):
        for column, setting in required.items():
            if column not in schema.names:
                lacking = sum(column not in s.names for s in schemas)
                raise ValueError(f"{setting}: {column!r} is not a column of {redact(f)} ({lacking} of {len(files)} "
                                 f"file(s) under {redact(uri)} lack it); its columns: {schema.names}")
        t = schema.field(image_column).type
        if not _image_type_ok(t):
            raise ValueError(f"data.image_column: {image_column!r} of {redact(f)} has type {t}; image bytes must be "
                             "binary or large_binary, or a struct with a binary `bytes` field (Hugging Face)")


def _norm_folder(batch: dict[str, np.ndarray], with_labels: bool, paths: bool = False) -> dict[str, np.ndarray]:
    names = [str(p) for p in batch["path"]]
    out = {"image": np.array([bytes(b) for b in batch["bytes"]], dtype=object), "key": np.array(names)}
    if with_labels:
        out["label"] = np.array([os.path.basename(os.path.dirname(p)) for p in names])
    if paths:
        out["path"] = np.asarray(batch["path"])
    return out


def _wds_captions(batch: dict[str, np.ndarray], n: int, field: str) -> np.ndarray:
    txt, js = batch.get("txt"), batch.get("json")
    out = []
    for i in range(n):
        cap = caption_text(txt[i]) if txt is not None else ""
        if not cap and js is not None:
            cap = json_caption(js[i], field)
        out.append(cap)
    return np.array(out, dtype=object)


def _norm_wds(batch: dict[str, np.ndarray], with_labels: bool, caption_field: str | None = None,
              paths: bool = False) -> dict[str, np.ndarray]:
    n = len(batch["__key__"])
    images: list[bytes] = [b""] * n
    for ext in WDS_IMAGE_KEYS:
        col = batch.get(ext)
        if col is None:
            continue
        for i, v in enumerate(col):
            if not images[i]:
                images[i] = _image_bytes(v)  # a sample without this member has NaN here (Ray's pandas block)
    out = {"image": np.array(images, dtype=object), "key": np.array([str(k) for k in batch["__key__"]])}
    if with_labels:
        if "cls" not in batch:
            raise ValueError("WebDataset shards have no `cls` member to use as labels")
        # errors="replace": a label that is not UTF-8 must not stop the read; it becomes a name no class has
        # a sample without a `cls` member has NaN here: _image_bytes makes it b"", so ""
        out["label"] = np.array([_image_bytes(v).decode("utf-8", errors="replace").strip() for v in batch["cls"]])
    if caption_field is not None:
        out["caption"] = _wds_captions(batch, n, caption_field)
    if paths:
        out["path"] = np.asarray(batch["path"])
    return out


def _norm_parquet(
    batch: dict[str, np.ndarray], image_column: str, label_column: str | None, key_column: str | None,
    caption_column: str | None = None,
) -> dict[str, np.ndarray]:
    images = np.array([_image_bytes(v) for v in batch[image_column]], dtype=object)
    n = len(images)
    keys = batch[key_column] if key_column else np.arange(n)
    out = {"image": images, "key": np.array([str(k) for k in keys])}
    if label_column:
        out["label"] = np.array([str(v) for v in batch[label_column]])
    if caption_column:
        out["caption"] = np.array([caption_text(v) for v in batch[caption_column]], dtype=object)
    if "path" in batch:  # asked for by read_images(paths=True)
        out["path"] = np.asarray(batch["path"])
    return out


def given_paths(files: list[str], uri: str) -> list[str]:
    """Caller-chosen files as paths on `uri`'s filesystem (a scheme, if given, is dropped), in the given order."""
    if not files:
        raise StorageError(f"no files given to read from {redact(uri)!r}")
    out = []
    for f in files:
        for scheme in ("s3://", "file://"):
            f = f[len(scheme):] if f.startswith(scheme) else f
        out.append(f if is_s3(uri) else os.path.abspath(os.path.expanduser(f)))
    return out


def _read_parquet_v1(files: list[str], fs: pafs.FileSystem, shuffle: Any, **blocks: Any) -> ray.data.Dataset:
    """read_parquet through Ray's V1 Parquet datasource. Ray 2.60's default (DataSourceV2) plans every execution
    as a ListFiles task then ReadFiles, and each training worker's epoch is an execution: measured on 1,000 images
    in 4 shards, 5–10 s before the first batch and 83–177 img/s end to end, against 1.7 s and 470–600 img/s with
    V1 on the same files (/tmp profile in the issue 12 note). The flag is read when the dataset is planned."""
    ctx = ray.data.DataContext.get_current()
    before, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(files, filesystem=fs, shuffle=shuffle, **blocks)
    finally:
        ctx.use_datasource_v2 = before


def read_images(
    source: str | Listing,
    *,
    fmt: str = "auto",
    s3: S3Settings | None = None,
    image_column: str = "image",
    label_column: str | None = None,
    with_labels: bool = False,
    limit: int | None = None,
    shuffle_files: bool = False,
    rows_per_block: int | None = 64,
    caption_column: str | None = None,
    shuffle_seed: int | None = None,
    files: list[str] | None = None,
    paths: bool = False,
    read_tasks: int | None = None,
) -> ray.data.Dataset:
    """Open an image corpus as a stream of {image: bytes, key: str[, label: str][, caption: str]} rows.

    `source`: a URI, listed here, or a `Listing` of one (not listed again).
    `caption_column` set: image-text data (WebDataset `txt`/`json`, or that Parquet column).
    `files` set: read exactly these (paths on the URI's filesystem, or URIs of its scheme) instead of listing it;
    `read_tasks`: by that many read tasks (each a run of consecutive files); `paths`: each row's source file in a
    `path` column (as `given_paths` writes it), which tells apart the epochs of a multi-epoch read.
    """
    s3 = s3 or S3Settings.resolve()
    schemas: tuple[pa.Schema, ...] | None = None
    given = files is not None
    if files is not None:  # a training worker's part of an epoch: exactly those, in that order; uri names the store
        uri = source.uri if isinstance(source, Listing) else source
        fmt = source.fmt if isinstance(source, Listing) else fmt
        fmt, files = _pick(given_paths(files, uri), fmt, uri)
    else:
        listing = _listing(source, fmt, s3)
        uri, fmt, files, schemas = listing.uri, listing.fmt, list(listing.files), listing.schemas
    if fmt == "video":
        raise ValueError(f"{redact(uri)!r} holds videos: they are read as clips (raysl.data.video.read_clips)")
    fs, _ = resolve(uri, s3)
    # A seeded file order (reseeded each epoch) makes a run's data order reproducible; None: unseeded.
    shuffle: ray.data.FileShuffleConfig | Literal["files"] | None = None
    if shuffle_files:
        shuffle = "files" if shuffle_seed is None else ray.data.FileShuffleConfig(seed=shuffle_seed)
    log.info("reading %d %s file(s) from %s", len(files), fmt, redact(uri))
    # A worker's own shards, unsplit: one read task per shard, so read, normalise and views fuse into one task
    # (Ray splits the read when there are fewer files than twice the CPUs, and a split read fuses with nothing).
    # Not for an image folder, whose files are single images: Ray groups those into tasks itself.
    one_per_file = given and not rows_per_block and fmt != "images"
    blocks: dict[str, Any] = {"override_num_blocks": len(files)} if one_per_file else {}
    if given and read_tasks:
        blocks = {"override_num_blocks": read_tasks}
    whole: dict[str, Any] = {"batch_size": None}  # a batch size after a read stops the two from fusing
    ds: ray.data.Dataset
    if fmt == "images":
        if caption_column:
            raise ValueError("image-text data must be WebDataset or Parquet; build them from an image folder and "
                             "a captions file with `raysl data shard SRC DST --captions captions.csv`")
        ds = ray.data.read_binary_files(files, filesystem=fs, include_paths=True, shuffle=shuffle)
        ds = ds.map_batches(_norm_folder,  # type: ignore[arg-type]
                             fn_kwargs={"with_labels": with_labels, "paths": paths}, batch_format="numpy", **whole)
    elif fmt == "webdataset":
        ds = ray.data.read_webdataset(files, filesystem=fs, decoder=None, shuffle=shuffle, include_paths=paths,
                                      **blocks)
        ds = ds.map_batches(_norm_wds,  # type: ignore[arg-type]
                             fn_kwargs={"with_labels": with_labels, "caption_field": caption_column, "paths": paths},
                             batch_format="numpy", **whole)
    else:
        schemas = schemas if schemas is not None else tuple(parquet_schemas(files, fs))
        # columns every file has, in the first file's order: an optional column (label, key) is used only then
        cols = [c for c in schemas[0].names if all(c in s.names for s in schemas[1:])]
        lab = label_column if with_labels else None
        if with_labels and lab is None:
            lab = "label" if "label" in cols else None
            if lab is None:
                raise ValueError(f"no label column in {redact(uri)}; set label_column (columns: {cols})")
        required = {image_column: "data.image_column"}
        if lab is not None:
            required.setdefault(lab, "label_column")
        if caption_column:
            required.setdefault(caption_column, "data.caption_column")
        _check_parquet(files, schemas, uri, required, image_column)
        key_col = "key" if "key" in cols else None
        wanted = list(dict.fromkeys(c for c in (image_column, lab, key_col, caption_column) if c))
        wanted += ["path"] if paths else []
        # select_columns, not read_parquet(columns=…) (deprecated in Ray 2.60); the projection is pushed into the read
        ds = _read_parquet_v1(files, fs, shuffle, include_paths=paths, **blocks).select_columns(wanted)
        ds = ds.map_batches(
            _norm_parquet,  # type: ignore[arg-type]
            fn_kwargs={"image_column": image_column, "label_column": lab, "key_column": key_col,
                       "caption_column": caption_column},
            batch_format="numpy", **whole,
        )
    if limit is not None:
        ds = ds.limit(limit)
    if rows_per_block:
        # A shard is often one block; split it (streaming) so decode and augmentation spread over every CPU.
        ds = ds.repartition(target_num_rows_per_block=rows_per_block)
    return ds


def read_labels(source: str | Listing, *, fmt: str = "auto", s3: S3Settings | None = None,
                label_column: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(keys, label names) of a labeled corpus (a URI, or a `Listing` of one), in one pass over its key and label
    columns."""
    ds = read_images(source, fmt=fmt, s3=s3, with_labels=True, label_column=label_column, rows_per_block=None)
    parts = list(ds.select_columns(["key", "label"]).iter_batches(batch_size=4096, batch_format="numpy"))
    if not parts:
        uri = source.uri if isinstance(source, Listing) else source
        raise ValueError(f"labeled data {redact(uri)!r} yielded no samples")
    return (np.concatenate([p["key"] for p in parts]).astype(str),
            np.concatenate([p["label"] for p in parts]).astype(str))


def source_columns(source: str | Listing, fmt: str = "auto", s3: S3Settings | None = None,
                   caption_column: str = "caption", label_column: str | None = None) -> set[str]:
    """Columns a source (a URI, or a `Listing` of one) offers after normalisation, checked against a method's
    required columns."""
    listing = _listing(source, fmt, s3)
    if listing.fmt == "parquet":
        cols = set(parquet_columns(listing, s3))
        return (cols | {"image", "key"} | ({"caption"} if caption_column in cols else set())
                | ({"label"} if label_column in cols else set()))
    if listing.fmt == "video":  # raysl.data.video.read_clips
        return {"frames", "key", "ok"}
    if listing.fmt == "webdataset":  # captions are per sample (`txt`/`json`); missing ones are counted, not fatal
        return {"image", "key", "label", "caption"}
    return {"image", "key", "label"}


def data_files(source: str | Listing, fmt: str = "auto", s3: S3Settings | None = None) -> list[str]:
    """The files a reader of the source (a URI, or a `Listing` of one) would read, in sorted order."""
    return list(_listing(source, fmt, s3).files)
