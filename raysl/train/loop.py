"""train_loop_per_worker: one explicit loop over steps (not epochs) that any registered Method runs in.

Per step: drop undecodable rows (counted), forward under DDP, backward, skip the update if the
gradient is not finite (counted; too many in a row stops the run), optimizer + LR schedule step, then
the method's on_step_end (EMA). Every `log_every` steps counters are all-reduced so every rank takes the
same decision, and rank 0 logs to MLflow; every `checkpoint_every` steps rank 0 saves a checkpoint.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn as nn
from ray.data.collate_fn import NumpyBatchCollateFn

from raysl.config import PretrainConfig
from raysl.figures import batch_png
from raysl.methods import get_method
from raysl.methods.base import Method, describe_encoder, export_config
from raysl.metric_logger import MetricLogger
from raysl.train.checkpoint import load_checkpoint, restore_state, save_checkpoint, warm_start
from raysl.train.online_eval import OnlineKNN
from raysl.train.optim import apply_weight_decay, build_optimizer, build_scheduler, weight_decay_at

log = logging.getLogger(__name__)


class DataQualityError(RuntimeError):
    """Too large a fraction of the input could not be decoded."""


class NonFiniteLossError(RuntimeError):
    """The loss or its gradient stayed NaN/inf for too many steps in a row."""


class NumpyCollate(NumpyBatchCollateFn):
    """Numeric columns → tensors; string columns (keys, labels) stay as numpy for bookkeeping."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:  # type: ignore[override]
        return {k: torch.from_numpy(np.ascontiguousarray(v)) if v.dtype.kind in "biuf" else v
                for k, v in batch.items()}


def _batches(shard: Any, batch_size: int, shuffle_buffer: int, seed: int) -> Iterator[dict[str, Any]]:
    epoch = 0
    while True:
        n = 0
        for b in shard.iter_torch_batches(
            batch_size=batch_size, drop_last=True, collate_fn=NumpyCollate(), prefetch_batches=2,
            local_shuffle_buffer_size=shuffle_buffer or None, local_shuffle_seed=seed + epoch,
        ):
            n += 1
            yield b
        if n == 0:
            raise RuntimeError(f"this worker's data shard yields no full batch of {batch_size}: "
                               "the corpus is smaller than train.batch_size")
        epoch += 1


def _all_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
        if backend == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return [float(x) for x in t.cpu()]


def _grads_finite(params: list[nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    return bool(torch.isfinite(norm))


def _filter_valid(batch: dict[str, Any], columns: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], int, list[str]]:
    valid: torch.Tensor = batch["valid"].bool()
    bad_keys = [str(k) for k in np.asarray(batch["key"])[~valid.numpy()]][:5]
    n_bad = int((~valid).sum())
    # BatchNorm needs ≥2 rows; in the rare batch that is nearly all bad, keep it whole (zeros included)
    # rather than let this rank skip a step the other ranks take.
    keep = valid if int(valid.sum()) >= 2 else torch.ones_like(valid)
    return {c: batch[c][keep] for c in columns}, n_bad, bad_keys


def train_loop_per_worker(loop_cfg: dict[str, Any]) -> None:
    cfg = PretrainConfig.model_validate(loop_cfg["config"])
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if tc.torch_threads:
        torch.set_num_threads(tc.torch_threads)
    torch.manual_seed(tc.seed + rank)
    device = ray.train.torch.get_device()

    method: Method = get_method(cfg.method.name).build(cfg)
    if world > 1 and tc.sync_batchnorm and device.type == "cuda":
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)  # type: ignore[assignment]
    method.to(device)  # before the optimizer, so restored optimizer state lands on the parameters' device
    opt = build_optimizer(method, cfg.optim, tc.batch_size)
    sched = build_scheduler(opt, cfg.optim, tc.steps)
    counters = {"seen": 0, "bad_images": 0, "skipped_steps": 0}
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_checkpoint(Path(d))
        start = restore_state(state, method=method, optimizer=opt, scheduler=sched)
        if rank == 0:  # saved counters are global sums; the other ranks count from zero
            counters.update(state["counters"])
        log.info("rank %d resumed at step %d", rank, start)
    elif loop_cfg.get("init_ref") is not None:  # a warm start: weights only, fresh optimizer and schedule
        warm_start(method, ray.get(loop_cfg["init_ref"]), str(tc.init_from))
    model = ray.train.torch.prepare_model(method, parallel_strategy_kwargs=method.ddp_kwargs() or None)

    tracker = MetricLogger(loop_cfg.get("tracking_uri"), loop_cfg.get("run_id")) if rank == 0 else None
    if tracker is not None and ckpt is not None:
        tracker.log({"resumed_from_step": start}, start)  # a restart shows in MLflow, not only in logs
    knn = OnlineKNN.from_ref(loop_cfg.get("eval_ref"), cfg) if rank == 0 else None
    spec = describe_encoder(cfg)
    full_config = export_config(cfg) if method.export_full else None
    params: list[nn.Parameter] = [p for p in method.parameters() if p.requires_grad]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (tc.amp and device.type == "cuda") else nullcontext()
    batches = _batches(ray.train.get_dataset_shard("train"), max(2, tc.batch_size // world),
                       cfg.data.shuffle_buffer, tc.seed * 1000 + rank)
    window: dict[str, float] = {"loss": 0.0, "n": 0, "samples": 0}
    extra: dict[str, float] = {}
    bad_in_row, t0 = 0, time.perf_counter()
    bad_examples: list[str] = []
    for step in range(start + 1, tc.steps + 1):
        if tc.fault_at_step == step and ckpt is None:
            raise RuntimeError(f"injected fault at step {step} (train.fault_at_step)")
        raw = next(batches)
        batch, n_bad, keys = _filter_valid(raw, method.batch_columns)
        counters["seen"] += len(raw["valid"])
        counters["bad_images"] += n_bad
        bad_examples = (bad_examples + keys)[-5:]
        if tracker is not None and step == start + 1 and ckpt is None:  # once a run: what the views look like
            first = {k: v[:8].clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
            tracker.log_image(partial(batch_png, first, spec["mean"], spec["std"]), "augmentations/first_batch.png")
        batch = method.collate(batch, step, rank)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        opt.zero_grad(set_to_none=True)
        with amp:
            out = method.forward_backward(model, batch)
        if _grads_finite(params):  # grads are all-reduced, so every rank decides the same
            opt.step()
            bad_in_row = 0
        else:
            counters["skipped_steps"] += 1
            bad_in_row += 1
            if bad_in_row >= tc.max_bad_steps:
                raise NonFiniteLossError(f"loss/gradient not finite for {bad_in_row} steps in a row "
                                         f"(step {step}); the last good checkpoint is kept")
        sched.step_update(step)
        if cfg.optim.weight_decay_end is not None:
            apply_weight_decay(opt, weight_decay_at(cfg.optim, step, tc.steps))
        extra = method.on_step_end(step, tc.steps)
        window["loss"] += float(out["loss"].detach())
        window["n"] += 1
        window["samples"] += len(next(iter(batch.values())))

        is_ckpt = step % tc.checkpoint_every == 0 or step == tc.steps
        if step % tc.log_every and not is_ckpt:
            continue
        loss_sum, n, samples, seen, bad = _all_sum([window["loss"], window["n"], window["samples"],
                                                    counters["seen"], counters["bad_images"]])
        elapsed = time.perf_counter() - t0
        metrics = {"loss": loss_sum / max(n, 1), "lr": max(g["lr"] for g in opt.param_groups),
                   "samples_per_s": samples / max(elapsed, 1e-9), "bad_images": bad,
                   "bad_fraction": bad / max(seen, 1), "skipped_steps": counters["skipped_steps"],
                   "step": step, **{k: float(v.detach()) for k, v in out.items() if k != "loss"}, **extra}
        if seen >= tc.batch_size and bad / seen > cfg.data.max_bad_fraction:
            raise DataQualityError(f"{int(bad)} of {int(seen)} images could not be decoded "
                                   f"({bad / seen:.1%} > data.max_bad_fraction={cfg.data.max_bad_fraction}); "
                                   f"examples: {bad_examples or 'on other workers'}")
        if knn is not None and (step % cfg.eval.every == 0 or step == tc.steps):
            metrics["knn_top1"] = knn.evaluate(method.encoder(), device)
            metrics.update(method.online_metrics(knn.data))
        if tracker is not None:
            tracker.log(metrics, step)
            log.info("step %d/%d %s", step, tc.steps,
                     " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step"))
        window = {"loss": 0.0, "n": 0, "samples": 0}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if is_ckpt and rank == 0:
                global_counts = {"seen": int(seen), "bad_images": int(bad),
                                 "skipped_steps": counters["skipped_steps"]}
                save_checkpoint(Path(tmp), method=method, encoder=method.encoder(), spec=spec, optimizer=opt,
                                scheduler=sched, step=step, counters=global_counts,
                                full_config=full_config)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
        t0 = time.perf_counter()
    if tracker is not None:
        tracker.close()
