"""`raysl bench video`: decode-to-clips throughput, frames/s per core, of raysl's PyAV clip reader vs decord.

Both sides run in this process on one core (one decoder thread each, torch and BLAS at one thread), as a Ray Data
task does: the same shuffled clip ids, 8 at a time, each batch grouping its clips by file (one open
video per file and batch on both sides). Every clip is 8 frames at stride 4 or 30, resized so the short side is
`--frame-side`. Videos are generated (raysl.data.synthetic_video: textured objects over a panning background,
x264 veryfast crf 18, GOP `--gop`) at 320×240 and 1280×720 and read from local disk and from a moto S3 server the
bench starts. PyAV reads S3 objects in ranged GETs through pyarrow; decord cannot read a stream and needs the whole
object in memory, so its S3 side downloads each video once per batch (what a task would have to do).
`ratio`/`median_paired_ratio` > 1: the first-named side is faster. The two sides' frames are compared too
(`mean_abs_diff`, 0–255): both must have decoded the same frames. Also timed: `plan_clips` per file (the
container-index read on the driver), and with `--ray` raysl's `read_clips` end to end on all CPUs of a local Ray
(frames/s per CPU at 2, 8 and 32 clips per task; compare with the in-process 1280x720_stride4 rate).
"""

from __future__ import annotations

import argparse
import io
import logging
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from raysl.bench.common import compare, start_moto, stop

log = logging.getLogger(__name__)
SIZES = ((320, 240), (1280, 720))
STRIDES = (4, 30)
T = 8
BUCKET = "raysl-bench-video"
DATA_VERSION = 1  # bump when the generator changes: cached videos are rebuilt

Decode = Callable[[list[str]], dict[str, np.ndarray]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clips", type=int, default=32, help="clips decoded per side and round (each config)")
    parser.add_argument("--frames", type=int, default=600, help="frames of each generated video (30 fps)")
    parser.add_argument("--gop", type=int, default=60, help="keyframe interval of the generated videos")
    parser.add_argument("--frame-side", type=int, default=224, help="short side of the decoded frames")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes of each side (alternating)")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 sides (no moto server)")
    parser.add_argument("--ray", action="store_true", help="also time read_clips end to end on a local Ray (720p, "
                                                           "stride 4, 2/8/32 clips per task)")
    parser.add_argument("--video-dir", help="keep the generated videos here, reused by later runs")


def _videos(folder: Path, frames: int, gop: int) -> dict[tuple[int, int], Path]:
    from raysl.data.synthetic_video import encode, scene

    out = {}
    for w, h in SIZES:
        path = folder / f"v{DATA_VERSION}-{w}x{h}-{frames}f-gop{gop}.mp4"
        if not path.exists():
            log.info("generating %s", path.name)
            tmp = path.with_suffix(".tmp.mp4")
            encode((f for f, _ in scene(frames, (w, h), 3, seed=w)), tmp, gop=gop)
            tmp.rename(path)
        out[(w, h)] = path
    return out


def _pyav(uri: str, stride: int, side: int) -> Decode:
    from raysl.data.video_decode import ClipDecoder
    from raysl.storage import resolve

    decoder = ClipDecoder(resolve(uri)[0], T, stride, side)

    def decode(ids: list[str]) -> dict[str, np.ndarray]:
        try:
            return decoder(ids)
        finally:
            decoder.close()  # per batch, as decord: every batch opens its files anew

    return decode


def _decord(uri: str, stride: int, size: tuple[int, int]) -> Decode | None:
    """decord's side: `size` (width, height), the output size PyAV's side makes of these videos."""
    try:
        import decord
    except ImportError:
        return None
    from raysl.data.video_decode import parse_clip_id
    from raysl.storage import is_s3, resolve

    fs, _ = resolve(uri)

    def decode(ids: list[str]) -> dict[str, np.ndarray]:
        by_file: dict[str, list[int]] = {}
        for clip in ids:
            file, start = parse_clip_id(clip)
            by_file.setdefault(file, []).append(start)
        frames: dict[tuple[str, int], np.ndarray] = {}
        for file, starts in by_file.items():
            src: Any = io.BytesIO(fs.open_input_stream(file).read()) if is_s3(uri) else file
            vr = decord.VideoReader(src, width=size[0], height=size[1], num_threads=1)
            want = sorted({s + j * stride for s in starts for j in range(T)})
            got = dict(zip(want, vr.get_batch(want).asnumpy(), strict=True))
            for s in starts:
                frames[(file, s)] = np.stack([got[s + j * stride] for j in range(T)])
        clips = [frames[parse_clip_id(c)] for c in ids]
        return {"frames": np.stack(clips), "key": np.array(ids, dtype=object), "ok": np.ones(len(ids), bool)}

    return decode


def _timed_pass(decode: Decode, batches: list[list[str]]) -> tuple[float, float, list[np.ndarray]]:
    """(frames per wall second, frames per CPU second of this process, the first clip of each batch) of one pass.
    CPU seconds count every thread: decord decodes on a thread of its own beside the caller's."""
    wall, cpu = time.perf_counter(), time.process_time()
    firsts = []
    for ids in batches:
        out = decode(ids)
        if not out["ok"].all():
            raise RuntimeError(f"{int((~out['ok']).sum())} clip(s) failed to decode")
        firsts.append(out["frames"][0])
    frames = sum(len(b) for b in batches) * T
    return frames / (time.perf_counter() - wall), frames / (time.process_time() - cpu), firsts


def _measure(sides: dict[str, Decode], batches: list[list[str]], rounds: int) -> dict[str, Any]:
    """Frames/s of every side (per wall second, and per CPU second: the per-core rate), best of `rounds` passes
    with the order rotated each round, and the ratios of the first side to each other (same clips, same moment)."""
    names = list(sides)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    firsts: dict[str, list[np.ndarray]] = {}
    for n in names:
        _timed_pass(sides[n], batches[:1])  # warm-up: imports, first opens and page cache outside the timing
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            w, c, firsts[n] = _timed_pass(sides[n], batches)
            wall[n].append(w)
            cpu[n].append(c)
    out: dict[str, Any] = {}
    for n in names:
        out[n] = {"fps": round(max(wall[n]), 1), "fps_per_cpu_s": round(max(cpu[n]), 1)}
    for other in names[1:]:
        diff = [np.abs(a.astype(np.int16) - b).mean() for a, b in zip(firsts[names[0]], firsts[other], strict=True)]
        out[f"{names[0]}_vs_{other}"] = {
            "wall": compare(wall[names[0]], wall[other], names[0], other),
            "per_cpu_s": compare(cpu[names[0]], cpu[other], names[0], other),
            "mean_abs_diff": round(float(np.max(diff)), 2)}
    return out


def _upload(files: list[Path]) -> None:
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    for f in files:
        client.upload_file(str(f), BUCKET, f.name)


def _plan_ms(uri: str, files: list[str]) -> float:
    """ms per file of `plan_clips` over `files` (after one untimed call: imports, the S3 client's set-up)."""
    from raysl.data.video import plan_clips

    plan_clips(files[:1], uri, None, T, 30, 30)
    start = time.perf_counter()
    plan_clips(files, uri, None, T, 30, 30)
    return round((time.perf_counter() - start) / len(files) * 1000, 1)


def _ray_read(video: Path, stride: int, side: int, clips: int) -> dict[str, Any]:
    """frames/s per CPU of `read_clips` on all CPUs of a local Ray, the clips of one video shuffled, at several
    clips per task (the first, untimed execution starts the workers)."""
    import ray

    from raysl.data.video import plan_clips, read_clips
    from raysl.train.stream import data_defaults

    ray.init(include_dashboard=False, log_to_driver=False)
    data_defaults()
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        uri = str(video.parent)
        ids = plan_clips([str(video)], uri, None, T, stride, stride)
        ids = random.Random(0).sample(ids, min(clips, len(ids)))

        def rate(per_task: int) -> float:
            start = time.perf_counter()
            n = sum(len(b["key"]) for b in read_clips(ids, uri, None, T, stride, side, per_task=per_task)
                    .iter_batches(batch_size=None, batch_format="numpy"))
            return round(n * T / (time.perf_counter() - start) / cpus, 1)

        rate(8)
        out: dict[str, Any] = {"cpus": cpus, "clips": len(ids)}
        out.update({f"clips_per_task_{n}_fps_per_cpu": rate(n) for n in (2, 8, 32)})
        return out
    finally:
        ray.shutdown()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from raysl.data.video import plan_clips
    from raysl.data.video_decode import output_size

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.video_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        videos = _videos(folder, args.frames, args.gop)
        moto = None
        if not args.no_s3:
            moto, _ = start_moto()
            _upload(list(videos.values()))
        try:
            report: dict[str, Any] = {"frame_side": args.frame_side, "frames_per_clip": T, "gop": args.gop,
                                      "clips_per_batch": 8, "plan_ms_per_file_local": _plan_ms(
                                          str(folder), [str(v) for v in videos.values()])}
            if moto is not None:
                report["plan_ms_per_file_s3"] = _plan_ms(f"s3://{BUCKET}", [f"{BUCKET}/{v.name}"
                                                                            for v in videos.values()])
            for (w, h), path in videos.items():
                for stride in STRIDES:
                    ids = plan_clips([str(path)], str(folder), None, T, stride, stride)
                    ids = random.Random(0).sample(ids, min(args.clips, len(ids)))  # a training order: shuffled
                    batches = [ids[i:i + 8] for i in range(0, len(ids), 8)]
                    row: dict[str, Any] = {"clips": len(ids)}
                    for where, uri, prefix in (("local", str(folder), ""), ("s3", f"s3://{BUCKET}", f"{BUCKET}/")):
                        if where == "s3" and moto is None:
                            continue
                        moved = [[c.replace(f"{path.parent}/", prefix) if prefix else c for c in b] for b in batches]
                        sides = {"pyav": _pyav(uri, stride, args.frame_side)}
                        alt = _decord(uri, stride, output_size(w, h, args.frame_side))
                        if alt is None:
                            row["decord"] = "unavailable (pip install decord)"
                        else:
                            sides["decord"] = alt
                        row[where] = _measure(sides, moved, args.rounds)
                        log.info("%dx%d stride %d %s: %s", w, h, stride, where, row[where])
                    report[f"{w}x{h}_stride{stride}"] = row
            if args.ray:  # the same clips as 1280x720_stride4 above, shuffled: compare with its in-process rate
                report["ray_read_clips_1280x720_stride4"] = _ray_read(videos[SIZES[1]], 4, args.frame_side,
                                                                      args.clips)
        finally:
            if moto is not None:
                stop(moto)
    return report
