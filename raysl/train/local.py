"""Single-process pretraining on in-memory images: the method, views, masks, optimizer, LR and
weight-decay schedules and momentum updates of a real run, in the same order as the Ray loop, without
Ray, data streaming, checkpoints or tracking. For learning tests and quick in-process experiments."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from raysl.config import PretrainConfig
from raysl.methods import get_method
from raysl.methods.base import Method
from raysl.train.optim import apply_weight_decay, build_optimizer, build_scheduler, weight_decay_at

log = logging.getLogger(__name__)

StepHook = Callable[[int, Method, dict[str, float]], None]


def _seed_views(view: Any, seed: int) -> None:
    """Seed the view transform's crop and augmentation draws (Ray's tasks leave them unseeded) so that an
    in-process run repeats: a learning test's margin is then one measured number, not a draw."""
    for t in (view, getattr(view, "views", view)):
        if isinstance(getattr(t, "rng", None), np.random.Generator):
            t.rng = np.random.default_rng(seed)


def pretrain_in_process(cfg: PretrainConfig, images: np.ndarray, *, sample_seed: int = 1,
                        on_step: StepHook | None = None,
                        labels: np.ndarray | None = None) -> tuple[Method, list[float]]:
    """Pretrain `cfg.method` for `cfg.train.steps` steps on encoded images (object array of bytes), drawing
    `cfg.train.batch_size` of them per step without replacement. Returns the method and its loss per step;
    `on_step(step, method, metrics)` runs after every step (step counts from 1, as in the loop). `labels` (label
    names, one per image) feed a supervised task such as fine-tuning."""
    torch.manual_seed(cfg.train.seed)
    method_cls = get_method(cfg.method.name)
    method, view = method_cls.build(cfg), method_cls.view_transform(cfg)
    _seed_views(view, sample_seed)
    method.train()
    steps, bs = cfg.train.steps, cfg.train.batch_size
    opt = build_optimizer(method, cfg.optim, bs)
    sched = build_scheduler(opt, cfg.optim, steps)
    keys = np.array([f"img-{i}" for i in range(len(images))])
    rng, losses = np.random.default_rng(sample_seed), []
    for step in range(1, steps + 1):
        idx = rng.choice(len(images), bs, replace=False)
        raw = view({"image": images[idx], "key": keys[idx],
                    **({"label": labels[idx]} if labels is not None else {})})
        batch = method.collate({c: torch.from_numpy(v) for c, v in raw.items()
                                if c != "valid" and v.dtype.kind in "biuf"}, step, 0)
        batch = method.device_augment(batch)
        opt.zero_grad(set_to_none=True)
        out = method.forward_backward(method, batch)
        opt.step()
        sched.step_update(step)
        if cfg.optim.weight_decay_end is not None:
            apply_weight_decay(opt, weight_decay_at(cfg.optim, step, steps))
        metrics = {k: float(v.detach()) for k, v in out.items() if v.numel() == 1}
        metrics.update(method.on_step_end(step, steps))
        losses.append(metrics["loss"])
        if step % max(1, cfg.train.log_every) == 0:
            log.info("step %d/%d loss=%.4f", step, steps, metrics["loss"])
        if on_step is not None:
            on_step(step, method, metrics)
    return method, losses
