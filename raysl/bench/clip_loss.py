"""`raysl bench clip-loss`: memory and time of the contrastive loss as the global batch grows.

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
import os
import socket
import time
from typing import Any

from raysl.bench.common import maxrss_mib, reset_peak, status_mib

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-batch", type=int, default=8192, help="largest global batch (from 256, ×2)")
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument("--chunk", type=int, default=512, help="rows per recomputed block")


def _one(rank: int, world: int, port: int, mode: str, global_batch: int, dim: int, chunk: int,
         results: Any) -> None:
    import torch
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
        reset = reset_peak()  # else the lifetime peak, which only over-states small sizes
        base, t0 = status_mib("VmRSS") if reset else maxrss_mib(), time.perf_counter()
        loss = step(img, txt)
        peak = status_mib("VmHWM") if reset else maxrss_mib()
        results.put((rank, peak - base, time.perf_counter() - t0, float(loss)))
    finally:
        if world > 1:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _measure(mode: str, global_batch: int, dim: int, chunk: int) -> dict[str, float]:
    # glibc raises its mmap threshold after the first large free, then keeps freed blocks in the heap, so
    # the resident set would count memory the loss already gave back. A fixed threshold (read by the
    # spawned interpreters at start-up) makes every large tensor its own mapping, returned when freed.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    import torch.multiprocessing as mp

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


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [256 * 2**i for i in range(int(math.log2(args.max_batch // 256)) + 1)]
    modes = ("naive", "local", "chunked")
    table: dict[str, dict[str, dict[str, float]]] = {m: {} for m in modes}
    for n in sizes:
        for mode in modes:
            table[mode][str(n)] = _measure(mode, n, args.dim, args.chunk)
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
