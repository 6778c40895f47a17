"""`raysl bench decode`: peak memory and time of one decode task: a view's `__call__` on a batch of large JPEG photos.

Each measurement runs in a fresh spawned process. Its peak RSS is the kernel's high-water mark (VmHWM), reset
just before the call (`/proc/self/clear_refs`), so `peak_mb - baseline_mb` is what the call added on top of the
interpreter, torch and the batch's encoded bytes. (`ru_maxrss` cannot be reset, and Linux carries it across
fork and exec: a child spawned by a process that once held 1 GB starts with 1 GB.)

`views_file` loads the transforms from another copy of `raysl/data/views.py` (e.g. the previous commit's,
`git show HEAD:raysl/data/views.py > /tmp/old_views.py`) to compare before and after in one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import multiprocessing as mp
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

from raysl.bench.common import maxrss_mib, reset_peak, status_mib

log = logging.getLogger(__name__)
VIEWS = ("byol", "eval")
MAX_PIXELS = 40_000_000  # raysl.config.MAX_IMAGE_PIXELS; a copy, so an older views.py needs no newer config


def _make_photos(folder: Path, n: int, width: int = 6000, height: int = 4000, quality: int = 90) -> list[Path]:
    """n photo-like JPEGs (a smooth colour gradient plus mild noise; pure noise would compress unlike any photo),
    written once and reused: 24 MP takes ~1 s each to make."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    # one noise field, shifted per image: generating 72 M normal samples per photo would dominate the set-up
    noise = rng.normal(0, 6, (height, width, 3)).astype(np.float32)
    yy = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    xx = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    paths = []
    for i in range(n):
        path = folder / f"photo-{width}x{height}-q{quality}-{i:04d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        c0, cx, cy = (rng.uniform(0, 255, (1, 1, 3)).astype(np.float32) for _ in range(3))
        img = c0 * (1 - xx) * (1 - yy) + cx * xx + cy * yy * (1 - xx)
        img += np.roll(noise, shift=(i * 37, i * 101), axis=(0, 1))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=quality)
    return paths


def _load_views(views_file: str | None) -> ModuleType:
    if views_file is None:
        from raysl.data import views

        return views
    spec = importlib.util.spec_from_file_location("views_under_test", views_file)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load {views_file}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _transform(views: ModuleType, view: str, image_size: int) -> Any:
    if view == "eval":
        return views.EvalView(image_size, MAX_PIXELS)
    # raysl's BYOL defaults (raysl.config), as arguments: they exist in every version of views.py
    return views.TwoViews(image_size, MAX_PIXELS, crop_scale=(0.08, 1.0), flip_p=0.5, jitter=(0.4, 0.4, 0.2, 0.1),
                          jitter_p=0.8, gray_p=0.2, blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2))


def _measure(paths: list[str], view: str, image_size: int, views_file: str | None) -> dict[str, Any]:
    """In the child: build the view, warm it up on one image, load the batch's bytes, then one timed call."""
    import torch

    torch.set_num_threads(1)
    transform = _transform(_load_views(views_file), view, image_size)
    small = Image.new("RGB", (64, 48), (120, 60, 30))
    with tempfile.SpooledTemporaryFile() as buf:
        small.save(buf, "JPEG")
        buf.seek(0)
        transform({"image": np.array([buf.read()], dtype=object), "key": np.array(["warm-up"])})
    batch = {"image": np.array([Path(p).read_bytes() for p in paths] + [b""], dtype=object),
             "key": np.array([Path(p).name for p in paths] + ["empty"])}
    reset = reset_peak()  # where it cannot be reset, the best there is: the lifetime high-water mark so far
    baseline = status_mib("VmRSS") if reset else maxrss_mib()
    start = time.perf_counter()
    out = transform(batch)
    seconds = time.perf_counter() - start
    peak = status_mib("VmHWM") if reset else maxrss_mib()
    n = len(paths)
    assert out["valid"][:n].all() and not out["valid"][n], "every photo decodes and the empty one is counted"
    return {"baseline_mb": round(baseline), "peak_mb": round(peak), "added_mb": round(peak - baseline),
            "output_mb": round(sum(v.nbytes for k, v in out.items() if k != "key") / 2**20, 1),
            "peak_reset": reset, "seconds": round(seconds, 2), "ms_per_image": round(seconds / n * 1000, 1)}


def _decode_memory(view: str = "byol", n_images: int = 256, *, image_size: int = 224, width: int = 6000,
                  height: int = 4000, quality: int = 90, photo_dir: str | None = None,
                  views_file: str | None = None) -> dict[str, Any]:
    """Peak RSS (MiB) and time of one `view` call ("byol": TwoViews, "eval": EvalView) on `n_images`
    width×height JPEGs plus one empty (bad) sample, in a fresh process.

    `photo_dir`: where the photos are made (once) and kept; default a temporary folder, removed after.
    `views_file`: another views.py to measure instead of raysl.data.views.
    """
    if view not in VIEWS:
        raise ValueError(f"view: {view!r} is not one of {VIEWS}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(photo_dir or tmp)
        paths = [str(p) for p in _make_photos(folder, n_images, width, height, quality)]
        jpeg_mb = sum(Path(p).stat().st_size for p in paths) / 2**20
        # spawn, not fork: a fresh interpreter, nothing of this process's memory; an executor, not a Pool,
        # so a child killed for memory raises (BrokenProcessPool) instead of being replaced and waited on forever
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            result: dict[str, Any] = pool.submit(_measure, paths, view, image_size, views_file).result()
    result = {"view": view, "image_size": image_size, "n_images": n_images, "photo": f"{width}x{height} q{quality}",
              "jpeg_mb": round(jpeg_mb), "decoded_mb_full_size": round(n_images * width * height * 3 / 2**20),
              "views_file": views_file or "raysl.data.views", **result}
    log.info("decode memory: %s", result)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--view", default="byol", choices=VIEWS, help="the transform measured: byol (TwoViews) "
                                                                      "or eval (EvalView)")
    parser.add_argument("--images", type=int, default=256, help="photos in the one decoded batch")
    parser.add_argument("--image-size", type=int, default=224, help="output side")
    parser.add_argument("--photo-dir", help="keep the generated 6000×4000 photos here (made once)")
    parser.add_argument("--before", help="also measure this copy of views.py (git show REV:raysl/data/views.py)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """`after`: raysl.data.views; with --before, `before`: that other views.py, in the same run."""
    runs = {"after": _decode_memory(args.view, args.images, image_size=args.image_size, photo_dir=args.photo_dir)}
    if args.before:
        runs["before"] = _decode_memory(args.view, args.images, image_size=args.image_size,
                                        photo_dir=args.photo_dir, views_file=args.before)
    return runs
