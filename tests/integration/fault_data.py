"""Data and configs for the fault-table tests: digits in Parquet shards, with a chosen share of poisoned
images (corrupt, truncated, zero bytes, a decompression bomb), and a small fast BYOL run over them."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from raysl.config import PretrainConfig, parse_config
from raysl.demo import shuffled_digits

BOMB_PIXELS = 4096  # data.max_image_pixels in these runs: a 128×128 image is a "bomb", the 32×32 digits are not


def poison(kind: int, good: bytes) -> bytes:
    """One of four kinds of bad image."""
    if kind == 0:
        return b"\x89PNG\r\n\x1a\n not an image"
    if kind == 1:
        return good[: len(good) // 2]  # truncated
    if kind == 2:
        return b""
    buf = io.BytesIO()
    Image.new("L", (128, 128)).save(buf, format="PNG")
    return buf.getvalue()


def write_poisoned(folder: Path, *, bad_fraction: float, shards: int = 8, n: int = 1200) -> list[str]:
    """`n` digits in `shards` Parquet files, `bad_fraction` of them poisoned; returns the poisoned keys."""
    pngs, _, order = shuffled_digits(0)
    rng = np.random.default_rng(1)
    bad = set(rng.choice(n, int(round(n * bad_fraction)), replace=False).tolist())
    folder.mkdir(parents=True, exist_ok=True)
    images, keys = [], []
    for i in range(n):
        key = f"{'bad' if i in bad else 'ok'}-{order[i]:05d}"
        images.append(poison(i % 4, pngs[i]) if i in bad else pngs[i])
        keys.append(key)
    for s, part in enumerate(np.array_split(np.arange(n), shards)):
        table = pa.table({"image": pa.array([images[i] for i in part], pa.binary()),
                          "key": pa.array([keys[i] for i in part])})
        pq.write_table(table, folder / f"part-{s:03d}.parquet")
    return sorted(k for k in keys if k.startswith("bad"))


def byol_cfg(data: str, storage: str, tracking: str, *, steps: int = 24, **overrides: Any) -> PretrainConfig:
    """A small BYOL run: resnet10t at 32 px, 2 workers, a checkpoint every 4 steps."""
    tree: dict[str, Any] = {
        "data": {"uri": data, "max_image_pixels": BOMB_PIXELS, "max_bad_fraction": 0.05, "shuffle_buffer": 64},
        "model": {"backbone": "resnet10t", "image_size": 32},
        "method": {"projector_hidden": 128, "predictor_hidden": 128, "projector_dim": 32},
        "optim": {"name": "adamw", "lr": 1e-3, "scale_lr": False, "warmup_steps": 2},
        "train": {"steps": steps, "batch_size": 32, "num_workers": 2, "log_every": 2, "checkpoint_every": 4,
                  "storage_path": storage, "torch_threads": 1, "max_failures": 2, "placement_timeout_s": 60},
        "tracking": {"tracking_uri": tracking, "experiment": "it-faults", "retry_s": 20},
    }
    for dotted, value in overrides.items():
        node = tree
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_config(tree)


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))
