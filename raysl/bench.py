"""`raysl bench`: side-by-side throughput benchmarks, each reported as a ratio measured in one run.

- ``ingest``: BYOL two-view images/s through the Ray Data pipeline training uses (``read_images`` →
  ``TwoViews`` in ``map_batches`` → ``iter_torch_batches``) vs a torch DataLoader running the same
  TwoViews transform per sample on the same shards' bytes, both limited to ``--workers`` CPUs.
  Parquet and WebDataset shards locally, and with ``--s3`` also read by Ray Data from a local moto S3.
- ``step``: BYOL training samples/s in a 1-worker Ray Train TorchTrainer vs a bare PyTorch loop, same
  model, optimizer, pre-generated batch and torch thread count (no data pipeline on either side);
  in raysl.bench_step. ``clip-loss`` and ``ijepa-context``: raysl.bench_methods.

The machine is assumed shared and noisy: the sides alternate over ``ROUNDS`` rounds; ``ratio`` divides the
best of each side, ``median_paired_ratio`` is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

log = logging.getLogger(__name__)
ROUNDS = 3
WARMUP_STEPS = 3
IMAGE_SIZE = 32
THREADS = min(2, os.cpu_count() or 1)  # torch threads on each side of `step`
Passes = Callable[[], Iterable[dict[str, Any]]]


def _compare(ray_runs: list[float], base_runs: list[float], ray_key: str, base_key: str) -> dict[str, Any]:
    """Best of rounds on each side and their ratio, plus the per-round (paired, same-moment) ratios."""
    paired = sorted(r / b for r, b in zip(ray_runs, base_runs, strict=True))
    return {ray_key: round(max(ray_runs), 2), base_key: round(max(base_runs), 2),
            "ratio": round(max(ray_runs) / max(base_runs), 3),
            "median_paired_ratio": round(paired[len(paired) // 2], 3),
            "paired_ratios": [round(r / b, 3) for r, b in zip(ray_runs, base_runs, strict=True)]}


def write_images(folder: Path, n: int, seed: int = 0) -> None:
    """n 32×32 RGB JPEGs of multi-scale smooth colour noise (natural-image-like spectra) in folder/all/."""
    rng = np.random.default_rng(seed)
    (folder / "all").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        acc = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
        for side, weight in ((2, 0.5), (4, 0.3), (8, 0.15), (32, 0.05)):
            low = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), mode="RGB")
            up = low.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
            acc += weight * np.asarray(up, dtype=np.float32)
        img = Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8), mode="RGB")
        img.save(folder / "all" / f"img-{i:06d}.jpg", format="JPEG", quality=90)


def load_shard_bytes(folder: Path, fmt: str) -> list[tuple[bytes, str]]:
    """(image bytes, key) rows of the local Parquet or WebDataset shards, for the DataLoader side."""
    rows: list[tuple[bytes, str]] = []
    if fmt == "parquet":
        for f in sorted(folder.glob("*.parquet")):
            t = pq.read_table(f, columns=["image", "key"]).to_pydict()
            rows += [(bytes(b), str(k)) for b, k in zip(t["image"], t["key"], strict=True)]
        return rows
    for f in sorted(folder.glob("*.tar")):
        with tarfile.open(f) as tar:
            for m in tar.getmembers():
                if m.isfile() and m.name.endswith(".jpg"):
                    data = tar.extractfile(m)
                    assert data is not None
                    rows.append((data.read(), m.name[: -len(".jpg")]))
    return rows


class ViewsDataset(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Per-sample BYOL views: the training TwoViews transform called on a 1-row batch."""

    def __init__(self, rows: list[tuple[bytes, str]], transform: Any) -> None:
        self.rows, self.transform = rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        data, key = self.rows[i]
        out = self.transform({"image": np.array([data], dtype=object), "key": np.array([key])})
        return {"view1": torch.from_numpy(out["view1"][0]), "view2": torch.from_numpy(out["view2"][0]),
                "valid": torch.from_numpy(out["valid"])[0]}


def _timed_pass(make_batches: Passes) -> float:
    """Images/s of one full pass over the data, timed start to end."""
    n, t0 = 0, time.perf_counter()
    for b in make_batches():
        n += len(b["view1"])
    return n / (time.perf_counter() - t0)


def ray_passes(uri: str, batch_size: int) -> Passes:
    """The training pipeline: read_images → TwoViews (map_batches, 64) → iter_torch_batches."""
    from raysl.config import parse_config
    from raysl.data.sources import read_images
    from raysl.methods.byol import BYOL
    from raysl.train.stream import NumpyCollate

    cfg = parse_config({"data": {"uri": uri}})  # data.format: auto, as in a default pretrain config
    ds = read_images(uri, fmt=cfg.data.format)
    ds = ds.map_batches(BYOL.view_transform(cfg), batch_size=64, batch_format="numpy")
    return lambda: ds.iter_torch_batches(batch_size=batch_size, collate_fn=NumpyCollate(), prefetch_batches=2)


def dataloader_passes(rows: list[tuple[bytes, str]], batch_size: int, workers: int) -> Passes:
    from raysl.config import parse_config
    from raysl.methods.byol import BYOL

    tv = BYOL.view_transform(parse_config({"data": {"uri": "unused"}}))
    # Not fork: forked copies of the Ray driver's gRPC state broke its connections here (a hang).
    mp_ctx = torch.multiprocessing.get_context("forkserver")
    mp_ctx.set_forkserver_preload(["torch", "torchvision", "raysl.data.views"])
    loader = torch.utils.data.DataLoader(ViewsDataset(rows, tv), batch_size=batch_size, num_workers=workers,
                                         multiprocessing_context=mp_ctx, persistent_workers=True)
    return lambda: iter(loader)


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    """A moto S3 server on a free port, and AWS_* variables pointing at it (set before Ray starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, endpoint
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start on port {port}") from None
            time.sleep(0.2)


def bench_ingest(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray.data import DataContext, ExecutionResources

    from raysl.data.shard import shard
    from raysl.train.launch import init_ray

    moto: subprocess.Popen[bytes] | None = None
    started_ray = not ray.is_initialized()
    with tempfile.TemporaryDirectory(prefix="raysl-bench-") as tmp:
        root = Path(tmp)
        try:
            if args.s3:
                if not started_ray:
                    log.warning("Ray is already running: its workers may not see the moto S3 endpoint")
                moto, endpoint = start_moto()
                log.info("moto S3 at %s", endpoint)
            init_ray()
            write_images(root / "src", args.images)
            rows_per_shard = max(64, -(-args.images // 8))
            folders = {fmt: root / fmt for fmt in ("parquet", "webdataset")}
            src = str(root / "src")
            n_shards = {fmt: len(shard(src, str(folder), fmt, rows_per_shard=rows_per_shard)["shards"])
                        for fmt, folder in folders.items()}
            uris = {(fmt, "local"): str(folder) for fmt, folder in folders.items()}
            if moto is not None:
                import boto3

                client = boto3.client("s3")
                client.create_bucket(Bucket="raysl-bench")
                for fmt, folder in folders.items():
                    for f in sorted(p for p in folder.iterdir() if p.is_file()):
                        client.upload_file(str(f), "raysl-bench", f"{fmt}/{f.name}")
                    uris[(fmt, "s3")] = f"s3://raysl-bench/{fmt}"
            ctx = DataContext.get_current()
            ctx.execution_options.resource_limits = ExecutionResources(cpu=args.workers)
            ctx.enable_progress_bars = False
            sides: dict[str, Passes] = {}
            for fmt, folder in folders.items():
                sides[f"{fmt}/dataloader"] = dataloader_passes(load_shard_bytes(folder, fmt), args.batch_size,
                                                               args.workers)
                for where in ("local", "s3"):
                    if (fmt, where) in uris:
                        sides[f"{fmt}/{where}/ray"] = ray_passes(uris[(fmt, where)], args.batch_size)
            for make_batches in sides.values():  # warm-up: worker processes, imports
                for _ in make_batches():
                    pass
            runs: dict[str, list[float]] = {k: [] for k in sides}
            for r in range(ROUNDS):
                for k, make_batches in sides.items():
                    runs[k].append(_timed_pass(make_batches))
                log.info("round %d/%d: %s", r + 1, ROUNDS, {k: round(v[-1], 1) for k, v in runs.items()})
        finally:
            if moto is not None:
                moto.terminate()
                moto.wait(timeout=10)
            if started_ray:
                ray.shutdown()
    results = {f"{fmt}/{where}": {
        **_compare(runs[f"{fmt}/{where}/ray"], runs[f"{fmt}/dataloader"], "ray_img_s", "dataloader_img_s"),
        "ray_source": "s3 (moto)" if where == "s3" else "local shards",
        "dataloader_source": "bytes of the local shards, preloaded"} for fmt, where in uris}
    return {
        "benchmark": "ingest",
        "config": {"images": args.images, "image_px": IMAGE_SIZE, "batch_size": args.batch_size,
                   "cpu_workers_each_side": args.workers, "rows_per_shard": rows_per_shard,
                   "shards_written": n_shards, "rounds": ROUNDS,
                   "ray_data_cpu_limit": args.workers, "map_batches_batch_size": 64,
                   "measured": "full passes over all images, timed start to end, after one untimed "
                               "warm-up pass per side; sides interleaved in each round",
                   "transform": "BYOL.view_transform(parse_config defaults) = TwoViews, both sides"},
        "results": results,
        "rounds_img_s": {k: [round(x, 1) for x in v] for k, v in runs.items()},
    }


def run(what: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one benchmark (`ingest`, `step`, `clip-loss`, `ijepa-context`) and return a JSON-serializable report."""
    if what in ("clip-loss", "ijepa-context"):
        from raysl.bench_methods import bench_clip_loss, bench_ijepa_context

        return bench_clip_loss(args) if what == "clip-loss" else bench_ijepa_context(args)
    if what == "ingest":
        return bench_ingest(args)
    if what == "step":
        from raysl.bench_step import bench_step

        return bench_step(args)
    if what == "decode":  # peak memory of one decode task on large photos; --before: another views.py beside it
        from raysl.bench_decode import decode_memory

        runs = {"after": decode_memory(args.view, args.images, image_size=args.image_size, photo_dir=args.photo_dir)}
        if args.before:
            runs["before"] = decode_memory(args.view, args.images, image_size=args.image_size,
                                           photo_dir=args.photo_dir, views_file=args.before)
        return runs
    raise ValueError(f"bench: {what!r} is not one of ('ingest', 'step', 'clip-loss', 'ijepa-context', 'decode')")
