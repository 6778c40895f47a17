"""`raysl bench step`: BYOL training samples/s in a 1-worker Ray Train TorchTrainer vs a bare PyTorch loop,
same model, optimizer, pre-generated batch and torch thread count (no data pipeline on either side); the
sides alternate over `--rounds` rounds; `ratio` divides the best of each side, `median_paired_ratio` is the
median of the per-round ratios."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raysl.bench.common import ROUNDS, compare

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
WARMUP_STEPS = 3
IMAGE_SIZE = 32
THREADS = min(2, os.cpu_count() or 1)  # torch threads on each side


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="resnet18", help="timm backbone of the BYOL model")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per step")
    parser.add_argument("--batches", type=int, default=20, help="timed steps on each side per round (after "
                                                                f"{WARMUP_STEPS} untimed ones)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds; the sides alternate in each")


def _byol_setup(backbone: str, batch_size: int) -> tuple[Any, torch.optim.Optimizer]:
    import torch

    from raysl.config import parse_config
    from raysl.methods import get_method
    from raysl.train.optim import build_optimizer

    cfg = parse_config({"data": {"uri": "unused"}, "model": {"backbone": backbone},
                        "train": {"batch_size": batch_size}})
    torch.manual_seed(0)
    method = get_method("byol").build(cfg)
    return method, build_optimizer(method, cfg.optim, batch_size)


def _timed_steps(model: Any, method: Any, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                 steps: int) -> float:
    """Samples/s over `steps` training steps after WARMUP_STEPS untimed ones."""
    total = WARMUP_STEPS + steps
    t0 = time.perf_counter()
    for step in range(1, total + 1):
        if step == WARMUP_STEPS + 1:
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(batch)
        out["loss"].backward()
        opt.step()
        method.on_step_end(step, total)
    return steps * len(batch["view1"]) / (time.perf_counter() - t0)


def _bare_step(cfg: dict[str, Any]) -> float:
    import torch

    torch.set_num_threads(cfg["threads"])
    method, opt = _byol_setup(cfg["backbone"], cfg["batch_size"])
    return _timed_steps(method, method, opt, cfg["batch"], cfg["steps"])


def _ray_train_step(cfg: dict[str, Any]) -> None:
    """TorchTrainer train function: the bare loop behind prepare_model, result sent with a checkpoint."""
    import ray.train
    import ray.train.torch
    import torch

    torch.set_num_threads(cfg["threads"])
    method, opt = _byol_setup(cfg["backbone"], cfg["batch_size"])
    model = ray.train.torch.prepare_model(method)
    device = ray.train.torch.get_device()
    batch = {k: v.to(device) for k, v in cfg["batch"].items()}
    rate = _timed_steps(model, method, opt, batch, cfg["steps"])
    with tempfile.TemporaryDirectory() as d:
        Path(d, "samples_per_s.txt").write_text(f"{rate}\n")
        ray.train.report({"samples_per_s": rate, "torch_threads": torch.get_num_threads()},
                         checkpoint=ray.train.Checkpoint.from_directory(d))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raysl.train.launch import init_ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE)
    batch = {v: torch.randint(0, 256, shape, dtype=torch.uint8, generator=g) for v in ("view1", "view2")}
    cfg = {"backbone": args.backbone, "batch_size": args.batch_size, "steps": args.batches,
           "threads": THREADS, "batch": batch}
    started_ray = not ray.is_initialized()
    bare: list[float] = []
    rays: list[float] = []
    try:
        init_ray()
        with tempfile.TemporaryDirectory(prefix="raysl-bench-") as tmp:
            for r in range(args.rounds):  # Ray side first: its start-up absorbs the new cluster's own start-up load
                trainer = TorchTrainer(
                    _ray_train_step, train_loop_config=cfg,
                    scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                    run_config=RunConfig(name=f"bench-step-{r}", storage_path=tmp))
                result = trainer.fit()
                if not result.metrics or "samples_per_s" not in result.metrics:
                    raise RuntimeError(f"Ray Train run reported no samples_per_s: {result.metrics!r}")
                rays.append(float(result.metrics["samples_per_s"]))
                bare.append(_bare_step(cfg))
                log.info("round %d/%d: bare %.1f samples/s, ray train %.1f samples/s", r + 1, args.rounds,
                         bare[-1], rays[-1])
    finally:
        if started_ray:
            ray.shutdown()
    return {
        "benchmark": "step",
        "config": {"method": "byol", "backbone": args.backbone, "image_px": IMAGE_SIZE,
                   "batch_size": args.batch_size, "timed_steps": args.batches, "warmup_steps": WARMUP_STEPS,
                   "torch_threads_each_side": THREADS, "rounds": args.rounds,
                   "optimizer": "raysl.train.optim.build_optimizer (config default: lars)",
                   "ray_train": "TorchTrainer, 1 worker, CPU=1, prepare_model (no DDP wrap at world size 1)",
                   "data": "pre-generated uint8 view1/view2, no Ray Data"},
        **compare(rays, bare, "ray_train_samples_s", "bare_samples_s"),
        "target": 0.9,
        "meets_target": max(rays) / max(bare) >= 0.9,
        "rounds_samples_s": {"bare": [round(x, 2) for x in bare], "ray_train": [round(x, 2) for x in rays]},
    }
