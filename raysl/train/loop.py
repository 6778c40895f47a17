"""train_loop_per_worker: one explicit loop over steps (not epochs) that any registered Method runs in.

Per step: drop undecodable rows (counted), forward under DDP, backward, skip the update if the
gradient is not finite (counted; too many in a row stops the run), optimizer + LR schedule step, then
the method's on_step_end (EMA). Every `log_every` steps counters are all-reduced so every rank takes the
same decision, and rank 0 logs to MLflow; every `checkpoint_every` steps rank 0 saves a checkpoint.
"""

from __future__ import annotations

import logging
import os
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

from raysl import storage
from raysl.config import PretrainConfig
from raysl.figures import batch_png
from raysl.methods import get_method
from raysl.methods.base import Method, describe_encoder, export_config
from raysl.metric_logger import MetricLogger
from raysl.train.checkpoint import load_checkpoint, restore_state, save_checkpoint, warm_start
from raysl.train.online_eval import OnlineKNN
from raysl.train.optim import apply_weight_decay, build_optimizer, build_scheduler, weight_decay_at
from raysl.train.step_guard import StepGuard
from raysl.train.stream import (
    TRACE_ENV,
    WorkerStream,
    batches_from_shard,
    epoch_reader,
    restore_position,
    trace,
    valid_rows,
)

log = logging.getLogger(__name__)


class DataQualityError(RuntimeError):
    """Too large a fraction of the input could not be decoded."""


class NonFiniteLossError(RuntimeError):
    """The loss or its gradient stayed NaN/inf for too many steps in a row."""


def _all_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
        if backend == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return [float(x) for x in t.cpu()]


def _valid_batch(batches: Iterator[dict[str, Any]], counters: dict[str, int]) -> tuple[dict[str, Any], list[str]]:
    """The next batch's decodable rows (at least two, for BatchNorm); the rows that are not are counted. A
    batch with fewer than two is counted and the next one drawn, so every rank still takes one step on images,
    never on the zeros that stand in for undecodable rows. Every tensor column but `valid` is kept (the views,
    or with `data.augment_on: gpu` the decoded images the device augments); strings (keys, labels) are not."""
    bad_keys: list[str] = []
    while True:
        raw = next(batches)
        valid: torch.Tensor = raw["valid"].bool()
        counters["seen"] += len(valid)
        counters["bad_images"] += int((~valid).sum())
        bad_keys = (bad_keys + [str(k) for k in np.asarray(raw["key"])[~valid.numpy()]])[-5:]
        if int(valid.sum()) >= 2:
            batch: dict[str, Any] = valid_rows(raw, valid)
            batch["key"] = np.asarray(raw["key"])[valid.numpy()]
            return batch, bad_keys


def _nan_hook(module: nn.Module, steps: set[int], current: list[int]) -> None:
    """Chaos testing (train.nan_at_steps): the encoder's input turns NaN at those steps, so the forward pass
    really runs on NaN (BatchNorm statistics included) and the guard must undo it."""
    if not steps:
        return

    def hook(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if current[0] in steps and args and isinstance(args[0], torch.Tensor):
            return (args[0] * float("nan"), *args[1:])
        return None

    module.register_forward_pre_hook(hook)


class FatalError(RuntimeError):
    """An error that would recur on every retry (bad config, refused checkpoint, data past its bad fraction,
    a loss that stays NaN): reported to the driver instead of raised, so Ray Train does not restart for it."""


FATAL_FILE = "raysl-stopped.txt"


def train_loop_per_worker(loop_cfg: dict[str, Any]) -> None:
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    try:
        _train(loop_cfg, rank, ctx.get_world_size())
    except FatalError as exc:
        # Every rank gets here together (set-up errors happen on all; the loop's stops are decided on all-reduced
        # counts), and returns: Ray Train sees a finished run, not a failure to retry. Rank 0 leaves the reason
        # beside the checkpoints for the driver, which raises it (Ray Train's result only carries the metrics
        # of the last checkpoint).
        cause = exc.__cause__ or exc
        log.error("rank %d stops: %s", rank, storage.redact_exc(cause))
        if rank == 0 and loop_cfg.get("fatal_uri"):
            storage.write_bytes(str(loop_cfg["fatal_uri"]), storage.redact_exc(cause).encode())


def _setup_error(exc: Exception) -> bool:
    # a refused checkpoint arrives as CheckpointRefused, a ValueError: the unpickler's own error never gets here
    return isinstance(exc, ValueError | FileNotFoundError | KeyError)


def _train(loop_cfg: dict[str, Any], rank: int, world: int) -> None:
    try:
        cfg = PretrainConfig.model_validate(loop_cfg["config"])
        state = _setup(cfg, loop_cfg, rank, world)
    except Exception as exc:
        if _setup_error(exc):
            raise FatalError(str(exc)) from exc
        raise
    try:
        _loop(cfg, loop_cfg, rank, world, *state)
    except (DataQualityError, NonFiniteLossError) as exc:
        raise FatalError(str(exc)) from exc
    finally:
        if state[7] is not None:  # the WorkerStream: its read-ahead stops with the run
            state[7].close()


def _setup(cfg: PretrainConfig, loop_cfg: dict[str, Any], rank: int, world: int) -> tuple[Any, ...]:
    tc = cfg.train
    if loop_cfg.get("trace_dir"):  # tests of exact resumption: which samples each step trained on
        os.environ[TRACE_ENV] = str(loop_cfg["trace_dir"])
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
    start, saved_position = 0, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_checkpoint(Path(d))
        start = restore_state(state, method=method, optimizer=opt, scheduler=sched)
        saved_position = state.get("data_position")
        if rank == 0:  # saved counters are global sums; the other ranks count from zero
            counters.update(state["counters"])
        log.info("rank %d resumed at step %d", rank, start)
    elif loop_cfg.get("init_ref") is not None:  # a warm start: weights only, fresh optimizer and schedule
        warm_start(method, ray.get(loop_cfg["init_ref"]), str(tc.init_from))
    per_worker = max(2, tc.batch_size // world)
    batches: Iterator[dict[str, Any]]
    stream: WorkerStream | None = None
    if loop_cfg.get("files_ref") is not None:
        stream = WorkerStream(epoch_reader(cfg, per_worker, rank, world), ray.get(loop_cfg["files_ref"]),
                              seed=tc.seed, rank=rank, world=world,
                              start=restore_position(saved_position, rank, world), budget=tc.steps - start)
        batches = stream
    else:
        batches = batches_from_shard(ray.train.get_dataset_shard("train"), per_worker, cfg.data.shuffle_buffer,
                           tc.seed * 1000 + rank)
    return method, opt, sched, counters, start, ckpt is not None, batches, stream, device


def _loop(cfg: PretrainConfig, loop_cfg: dict[str, Any], rank: int, world: int, method: Method, opt: Any,
          sched: Any, counters: dict[str, int], start: int, resumed: bool, batches: Iterator[dict[str, Any]],
          stream: WorkerStream | None, device: torch.device) -> None:
    tc = cfg.train
    model = ray.train.torch.prepare_model(method, parallel_strategy_kwargs=method.ddp_kwargs() or None)
    tracker = MetricLogger(loop_cfg.get("tracking_uri"), loop_cfg.get("run_id")) if rank == 0 else None
    if tracker is not None and resumed:
        tracker.log({"resumed_from_step": start}, start)  # a restart shows in MLflow, not only in logs
    knn = OnlineKNN.from_ref(loop_cfg.get("eval_ref"), cfg) if rank == 0 else None
    spec = describe_encoder(cfg)
    full_config = export_config(cfg) if method.export_full else None
    guard = StepGuard(method, cfg.optim.clip_grad_norm)
    current = [0]
    _nan_hook(method.encoder(), set(tc.nan_at_steps), current)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (tc.amp and device.type == "cuda") else nullcontext()
    window: dict[str, float] = {"loss": 0.0, "n": 0, "samples": 0}
    extra: dict[str, float] = {}
    bad_in_row, t0 = 0, time.perf_counter()
    bad_examples: list[str] = []
    for step in range(start + 1, tc.steps + 1):
        current[0] = step
        batch, keys = _valid_batch(batches, counters)
        bad_examples = (bad_examples + keys)[-5:]
        trace(step, stream.position.epoch if stream else -1, batch.pop("key"), rank)
        batch = method.collate(batch, step, rank)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        batch = method.device_augment(batch)
        if tracker is not None and step == start + 1 and not resumed:  # once a run: what the views look like
            first = {k: v[:8].detach().cpu().clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
            tracker.log_image(partial(batch_png, first, spec["mean"], spec["std"]), "augmentations/first_batch.png")
        opt.zero_grad(set_to_none=True)
        guard.before_forward()
        with amp:
            out = method.forward_backward(model, batch)
        if guard.after_backward():  # grads are all-reduced, so every rank decides the same
            opt.step()
            bad_in_row = 0
            extra = method.on_step_end(step, tc.steps)
            window["loss"] += float(out["loss"].detach())
            window["n"] += 1
        else:  # nothing of this step stays: no update, no EMA step, BatchNorm statistics put back
            counters["skipped_steps"] += 1
            bad_in_row += 1
            if bad_in_row >= tc.max_bad_steps:
                raise NonFiniteLossError(f"loss/gradient not finite for {bad_in_row} steps in a row "
                                         f"(step {step}); the last good checkpoint is kept")
        sched.step_update(step)
        if cfg.optim.weight_decay_end is not None:
            apply_weight_decay(opt, weight_decay_at(cfg.optim, step, tc.steps))
        window["samples"] += len(next(iter(batch.values())))

        is_ckpt = step % tc.checkpoint_every == 0 or step == tc.steps
        if step % tc.log_every and not is_ckpt:
            continue
        loss_sum, n, samples, seen, bad = _all_sum([window["loss"], window["n"], window["samples"],
                                                    counters["seen"], counters["bad_images"]])
        elapsed = time.perf_counter() - t0
        metrics = {"loss": loss_sum / n if n else float("nan"), "lr": max(g["lr"] for g in opt.param_groups),
                   "samples_per_s": samples / max(elapsed, 1e-9), "bad_images": bad,
                   "bad_fraction": bad / max(seen, 1), "skipped_steps": counters["skipped_steps"],
                   "grad_norm": guard.last_norm, "step": step,
                   **{k: float(v.detach()) for k, v in out.items() if k != "loss"}, **extra}
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
        positions = _positions(stream, rank, world) if is_ckpt else None
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if is_ckpt and rank == 0:
                global_counts = {"seen": int(seen), "bad_images": int(bad),
                                 "skipped_steps": counters["skipped_steps"]}
                save_checkpoint(Path(tmp), method=method, encoder=method.encoder(), spec=spec, optimizer=opt,
                                scheduler=sched, step=step, counters=global_counts,
                                full_config=full_config, data_position=positions)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
        t0 = time.perf_counter()
    if tracker is not None:
        tracker.close(timeout=max(30.0, cfg.tracking.retry_s))  # an outage at the end: flush once it is back


def _positions(stream: WorkerStream | None, rank: int, world: int) -> list[list[int]] | None:
    """Every rank's [epoch, batches] (a sum of one-hot rows: one collective, the same on every rank)."""
    if stream is None:
        return None
    flat = [0.0] * (2 * world)
    flat[2 * rank : 2 * rank + 2] = [float(x) for x in stream.position.as_list()]
    summed = _all_sum(flat)
    return [[int(summed[2 * r]), int(summed[2 * r + 1])] for r in range(world)]
