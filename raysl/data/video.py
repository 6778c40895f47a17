"""Video files → clips of frames (DoRA): plan clip ids from container metadata, decode them in Ray Data CPU tasks.

PyAV, not decord (docs/DORA-NOTES.md §3): PyAV decodes everything before the damage in a truncated file and fails
with catchable errors, where decord loses the whole file and can abort the process.

- `plan_clips` (driver): every file's frame count from its container's index → clip ids `f"{file}#{start}"`.
- `read_clips`: clip ids → a Dataset of {"frames": uint8 (T, h, w, 3), short side frame_side, "key": clip id,
  "ok": bool}, in the order of the ids. A task decodes a few clips at a time (never a whole video); a clip with
  a frame that cannot be decoded is zeros and ok=False, named in a warning.
- Clip shards (`raysl data shard VIDEOS DST --clips`): Parquet of {"frames": list of JPEG bytes, "key"};
  `is_clip_shards` recognises such a listing and `read_clip_shards` reads it to the same rows as `read_clips`
  (both live in raysl/data/clip_shards.py, which imports no torch: Ray tasks unpickle it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.data

from raysl.data.clip_shards import is_clip_shards, read_clip_shards
from raysl.data.sources import VIDEO_SUFFIXES
from raysl.data.video_decode import (
    DECODE_ERRORS,
    ClipDecoder,
    MissingFrame,
    clip_id,
    close_container,
    fs_path,
    open_container,
    parse_clip_id,
    stream_rate,
)
from raysl.storage import S3Settings, StorageError, redact, redact_exc, resolve

__all__ = ["VIDEO_SUFFIXES", "plan_clips", "read_clips", "is_clip_shards", "read_clip_shards", "probe",
           "clips_per_task"]

log = logging.getLogger(__name__)

# Frames a task decodes and holds at once. Larger batches measured faster (raysl bench video --ray: 48 shuffled
# 8-frame clips of one 720p video → 224 px, 2 CPUs: 2 / 8 / 32 clips per task → 26 / 40 / 77 frames/s per CPU, vs
# 81 in one process): fewer task start-ups, and more clips of one file decoded in one forward pass. The byte
# budget keeps a task to a few clips of DoRA-size frames (7 clips of 8 frames at 448×796); the clip cap bounds a
# task's time, which grows with the source's resolution (a 4K clip decodes for seconds), not the output's.
BATCH_BYTES = 64 * 2**20
MAX_CLIPS_PER_TASK = 16
MAX_TASKS = 4096  # beyond this a task takes several batches (streamed out one by one): fewer read tasks to plan
PROBE_THREADS = 16  # opening an S3 object is mostly waiting on a round trip or two
PROBE_TASK_FILES = 64  # files per Ray task, when a Ray cluster is up and there are more than RAY_PROBE_FILES
RAY_PROBE_FILES = 512  # S3 objects: beyond this, opened by Ray tasks over the cluster (not measured on real S3)


def _count_packets(container: Any, stream: Any) -> int:
    """Frames of a stream whose header does not say (fragmented mp4, WebM/MKV): its packets, demuxed, not decoded
    (this reads the whole file once). A read error ends the count: frames past it are not decodable either."""
    n = 0
    try:
        for packet in container.demux(stream):
            n += packet.size > 0  # the demuxer ends with an empty flush packet
    except DECODE_ERRORS as exc:
        log.warning("counting frames stopped after %d: %s", n, redact(str(exc)))
    return n


def probe(fs: pafs.FileSystem, path: str) -> tuple[int, float]:
    """(frame count, fps) of a video file's first video stream, from its container's index."""
    f, container = open_container(fs, path)
    try:
        if not container.streams.video:
            raise MissingFrame("no video stream")
        stream = container.streams.video[0]
        fps = float(stream_rate(stream))
        frames = int(stream.frames or 0) or _count_packets(container, stream)
        return frames, fps
    finally:
        close_container(f, container)


def _probe_many(fs: pafs.FileSystem, files: list[str]) -> list[tuple[int, float] | str]:
    """Each file's (frames, fps), or the reason it cannot be opened, in order. Local files one after another
    (an open is ~2 ms of CPU: threads only add GIL contention), S3 objects on threads (an open is a round trip or
    two; measured on a local moto server, 16 threads: 8 ms/file against 12 one at a time)."""

    def one(path: str) -> tuple[int, float] | str:
        try:
            return probe(fs, path)
        except DECODE_ERRORS as exc:
            return redact_exc(exc)

    if len(files) == 1 or not isinstance(fs, pafs.S3FileSystem):
        return [one(f) for f in files]
    with ThreadPoolExecutor(max_workers=min(PROBE_THREADS, len(files))) as pool:
        return list(pool.map(one, files))


@ray.remote(num_cpus=1)
def _probe_task(fs: pafs.FileSystem, files: list[str]) -> list[tuple[int, float] | str]:
    return _probe_many(fs, files)


def plan_clips(files: list[str], uri: str, s3: S3Settings | None, frames_per_clip: int, frame_stride: int,
               clip_every: int) -> list[str]:
    """Clip ids `f"{file}#{start}"` of every video in `files` (paths on `uri`'s filesystem), in file order, for
    start = 0, clip_every, … while start + (frames_per_clip - 1)·frame_stride < the file's frame count.

    A file that cannot be opened is logged and yields no clips; fails, naming the URI, when none can be opened or
    none is long enough for one clip. A container whose header has no frame count (Matroska/WebM, fragmented
    mp4) is read through once to count its packets. Local files are opened here one by one (~2 ms each), S3
    objects on 16 threads, or by Ray tasks over the cluster when there are many."""
    if min(frames_per_clip, frame_stride, clip_every) < 1:
        raise ValueError("frames_per_clip, frame_stride and clip_every must be at least 1")
    if not files:
        raise StorageError(f"no video files given to read from {redact(uri)!r}")
    fs, _ = resolve(uri, s3 or S3Settings.resolve())
    paths = [fs_path(f) for f in files]
    if len(paths) > RAY_PROBE_FILES and isinstance(fs, pafs.S3FileSystem) and ray.is_initialized():
        chunks = [paths[i:i + PROBE_TASK_FILES] for i in range(0, len(paths), PROBE_TASK_FILES)]
        found = [r for part in ray.get([_probe_task.remote(fs, c) for c in chunks]) for r in part]
    else:
        found = _probe_many(fs, paths)
    span = (frames_per_clip - 1) * frame_stride
    ids: list[str] = []
    failed = [(p, r) for p, r in zip(paths, found, strict=True) if isinstance(r, str)]
    for path, result in zip(paths, found, strict=True):
        if not isinstance(result, str):
            ids.extend(clip_id(path, s) for s in range(0, max(0, result[0] - span), clip_every))
    for path, reason in failed[:10]:
        log.warning("skipping video %s: it cannot be opened (%s)", redact(path), reason)
    if failed:
        log.warning("%d of %d video file(s) under %s cannot be opened and yield no clips", len(failed),
                    len(paths), redact(uri))
    if len(failed) == len(paths):
        raise StorageError(f"none of the {len(paths)} video file(s) under {redact(uri)!r} can be opened; the first: "
                           f"{redact(failed[0][0])}: {failed[0][1]}")
    if not ids:
        longest = max(r[0] for r in found if not isinstance(r, str))
        raise ValueError(f"no video under {redact(uri)!r} is long enough for a clip of {frames_per_clip} frames at "
                         f"stride {frame_stride} ({span + 1} frames; the longest has {longest})")
    log.info("planned %d clip(s) of %d frames at stride %d from %d video(s) under %s", len(ids), frames_per_clip,
             frame_stride, len(paths) - len(failed), redact(uri))
    return ids


def clips_per_task(frames_per_clip: int, frame_side: int) -> int:
    """Clips per task so that their frames (16:9 at short side `frame_side`) fill about BATCH_BYTES."""
    clip = frames_per_clip * frame_side * round(frame_side * 16 / 9) * 3
    return max(1, min(MAX_CLIPS_PER_TASK, BATCH_BYTES // clip))


def _decode_rows(batch: dict[str, np.ndarray], plan: Any, fs: pafs.FileSystem, frames_per_clip: int,
                 frame_stride: int, frame_side: int, per_batch: int) -> Iterator[dict[str, np.ndarray]]:
    """A block of row numbers → clip batches of `per_batch`, each yielded (and sent on) as soon as it is decoded."""
    files, index = ray.get(plan)  # zero-copy from the node's object store
    rows = batch["id"]
    decoder = ClipDecoder(fs, frames_per_clip, frame_stride, frame_side)
    try:
        for i in range(0, len(rows), per_batch):
            yield decoder([clip_id(files[f], int(s)) for f, s in index[rows[i:i + per_batch]]])
    finally:
        decoder.close()


def read_clips(clip_ids: list[str], uri: str, s3: S3Settings | None, frames_per_clip: int, frame_stride: int,
               frame_side: int, *, per_task: int | None = None) -> ray.data.Dataset:
    """A Dataset of {"frames": uint8 (T, h, w, 3) with short side `frame_side`, "key": the clip id, "ok": bool},
    one row per clip id in order. ok=False: a frame of the clip could not be decoded (then "frames" is zeros of
    the video's output shape, or (T, frame_side, frame_side, 3) when the file does not open).

    The ids are put once in the object store as (file number, start) pairs; each task decodes a range of them,
    `per_task` at a time (default `clips_per_task`: ~64 MiB of frames), never a whole video: a task holds one
    batch, or (with more than MAX_TASKS·per_task ids, when tasks take several batches) what Ray Data buffers into
    one output block, at most its target_max_block_size (128 MiB). Keys come out as
    `f"{file}#{start}"` (the form `plan_clips` makes)."""
    if not clip_ids:
        raise ValueError(f"no clips to read from {redact(uri)!r}")
    fs, _ = resolve(uri, s3 or S3Settings.resolve())
    numbers: dict[str, int] = {}
    index = np.empty((len(clip_ids), 2), np.int64)
    for i, clip in enumerate(clip_ids):
        file, start = parse_clip_id(clip)
        index[i] = numbers.setdefault(fs_path(file), len(numbers)), start
    plan = ray.put((list(numbers), index))
    per_task = per_task or clips_per_task(frames_per_clip, frame_side)
    tasks = max(1, min(-(-len(clip_ids) // per_task), MAX_TASKS))
    ds = ray.data.range(len(clip_ids), override_num_blocks=tasks).map_batches(
        _decode_rows,  # type: ignore[arg-type]
        fn_kwargs={"plan": plan, "fs": fs, "frames_per_clip": frames_per_clip, "frame_stride": frame_stride,
                   "frame_side": frame_side, "per_batch": per_task},
        batch_size=None, batch_format="numpy")
    ds.context.execution_options.preserve_order = True
    return ds
