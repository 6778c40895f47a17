"""Method benchmarks, each a side-by-side ratio measured in one run.

`raysl bench ijepa-context`: I-JEPA's context encoder forward+backward on the visible patches only vs a
full-image forward+backward of the same ViT, interleaved; plus the kept context fraction per grid size.

`raysl bench clip-loss`: memory and time of the contrastive loss as the global batch grows.

Three ways to score a global batch G of (image, text) feature pairs, each measured side by side in fresh
processes (forward + backward of the loss alone, one torch thread each):
- naive: one process builds the whole G×G logit matrix;
- local: 2 gloo workers, each scoring its G/2 rows against all G columns (all-gather with gradients);
- chunked: the same, rows scored `chunk` at a time and recomputed in backward.
Peak memory is the rise of the process's resident high-water mark during the loss (reset just before it
through /proc/self/clear_refs; the larger worker's), after one small warm-up call.
"""

from __future__ import annotations

import argparse
import logging
import math
import resource
import socket
import time
from typing import Any

import torch
import torch.multiprocessing as mp

log = logging.getLogger(__name__)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> float:
    """Reset the process's resident high-water mark (Linux ≥ 4.0) and return the current resident MiB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux: fall back on the lifetime peak, which only over-states small sizes
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return _status_mib("VmRSS")


def _peak_mib() -> float:
    try:
        return _status_mib("VmHWM")
    except (OSError, RuntimeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _one(rank: int, world: int, port: int, mode: str, global_batch: int, dim: int, chunk: int,
         results: Any) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    from raysl.methods.contrastive import clip_loss, naive_clip_loss

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        b = global_batch // world
        g = torch.Generator().manual_seed(rank)
        img = F.normalize(torch.randn(b, dim, generator=g), dim=-1).requires_grad_()
        txt = F.normalize(torch.randn(b, dim, generator=g), dim=-1).requires_grad_()
        scale = torch.tensor(1 / 0.07, requires_grad=True)

        def step(i: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if mode == "naive":
                loss = naive_clip_loss(i, t, scale)
            else:
                loss = clip_loss(i, t, scale, chunk=chunk if mode == "chunked" else None)
            loss.backward()
            return loss.detach()

        step(img[:8].detach().requires_grad_(), txt[:8].detach().requires_grad_())  # lazy imports, first-call set-up
        if world > 1:
            dist.barrier()
        base, t0 = _reset_peak(), time.perf_counter()
        loss = step(img, txt)
        results.put((rank, _peak_mib() - base, time.perf_counter() - t0, float(loss)))
    finally:
        if world > 1:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(mode: str, global_batch: int, dim: int, chunk: int) -> dict[str, float]:
    import os

    # glibc raises its mmap threshold after the first large free, then keeps freed blocks in the heap, so
    # the resident set would count memory the loss already gave back. A fixed threshold (read by the
    # spawned interpreters at start-up) makes every large tensor its own mapping, returned when freed.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    world = 1 if mode == "naive" else 2
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_one, args=(r, world, port, mode, global_batch, dim, chunk, results))
             for r in range(world)]
    for p in procs:
        p.start()
    rows = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return {"peak_mib": max(r[1] for r in rows), "seconds": max(r[2] for r in rows), "loss": rows[0][3]}


def _slope(xs: list[int], ys: list[float]) -> float:
    """Growth exponent between the two largest sizes: ~1 linear, ~2 quadratic."""
    (x0, y0), (x1, y1) = (xs[-2], max(ys[-2], 1e-3)), (xs[-1], max(ys[-1], 1e-3))
    return math.log(y1 / y0) / math.log(x1 / x0)


def bench_clip_loss(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [256 * 2**i for i in range(int(math.log2(args.max_batch // 256)) + 1)]
    modes = ("naive", "local", "chunked")
    table: dict[str, dict[str, dict[str, float]]] = {m: {} for m in modes}
    for n in sizes:
        for mode in modes:
            table[mode][str(n)] = measure(mode, n, args.dim, args.chunk)
            log.info("G=%d %-8s %s", n, mode, table[mode][str(n)])
    top = str(sizes[-1])
    return {
        "dim": args.dim, "chunk": args.chunk, "workers": 2, "sizes": sizes,
        "results": table,
        "memory_growth_exponent": {m: round(_slope(sizes, [table[m][str(n)]["peak_mib"] for n in sizes]), 2)
                                   for m in modes},
        f"memory_ratio_vs_naive_at_{top}": {m: round(table[m][top]["peak_mib"] / max(table["naive"][top]["peak_mib"],
                                                                                     1e-3), 3) for m in modes},
        f"time_ratio_vs_naive_at_{top}": {m: round(table[m][top]["seconds"] / table["naive"][top]["seconds"], 3)
                                          for m in modes},
    }


def bench_ijepa_context(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

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
