"""`raysl bench ijepa-context`: I-JEPA's context encoder forward+backward on the visible patches only vs a
full-image forward+backward of the same ViT, interleaved; plus the kept context fraction per grid size and
the mask sampler's time per batch.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--batches", type=int, default=20, help="timed steps of each kind (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from raysl.config import load_config
    from raysl.data.masks import MaskSpec, sample_masks
    from raysl.methods.ijepa import IJEPA, vit_tokens

    torch.set_num_threads(args.threads)
    cfg = load_config("ijepa-cifar-cpu", ["data.uri=unused"])
    model = IJEPA.build(cfg)
    vit: Any = model.context_encoder
    grid = model.grid
    x = torch.randn(args.batch_size, 3, cfg.model.image_size, cfg.model.image_size)
    times: dict[str, list[float]] = {"visible": [], "full": []}
    kept = []
    for step in range(args.batches + 1):
        ctx, _ = sample_masks(0, 0, step, args.batch_size, grid, model.spec)
        kept.append(ctx.shape[1])
        for name, keep in (("visible", torch.from_numpy(ctx)), ("full", None)):
            t0 = time.perf_counter()
            vit_tokens(vit, x, keep=keep).float().pow(2).mean().backward()
            if step:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
            vit.zero_grad(set_to_none=True)
    fractions = {}
    for g in (8, 14, 16, 32):
        # Sampling time per batch bounds what moving the sampler from collate into Ray Data could save.
        t0 = time.perf_counter()
        n = [sample_masks(1, 0, s, args.batch_size, (g, g), MaskSpec())[0].shape[1] for s in range(50)]
        fractions[f"{g}x{g}"] = {"kept_patches": round(float(np.mean(n)), 1), "of": g * g,
                                 "fraction": round(float(np.mean(n)) / (g * g), 3),
                                 "sample_ms_per_batch": round((time.perf_counter() - t0) / 50 * 1e3, 2)}
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "backbone": cfg.model.backbone, "image_size": cfg.model.image_size, "patch_size": cfg.model.patch_size,
        "batch_size": args.batch_size, "threads": args.threads,
        "visible_patches_mean": round(float(np.mean(kept)), 1), "grid_patches": grid[0] * grid[1],
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "visible_vs_full_time_ratio": round(med["visible"] / med["full"], 3),
        "kept_context_fraction_by_grid": fractions,
        "mask_sampling_vs_visible_step_ratio": round(fractions["8x8"]["sample_ms_per_batch"] / 1e3 / med["visible"], 4),
    }
