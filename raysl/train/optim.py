"""Optimizers and LR schedules from timm: LARS / AdamW / SGD, linear warm-up then cosine, per step.

Biases and normalization weights get no weight decay (and so no LARS adaptation), as in BYOL.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from raysl.config import OptimConfig
from raysl.methods.base import Method


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The paper's linear scaling: lr = base_lr × batch / 256."""
    return cfg.lr * global_batch / 256 if cfg.scale_lr else cfg.lr


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = {}
    if cfg.name in ("lars", "sgd"):
        kwargs["momentum"] = cfg.momentum
    # A method may bring its own groups (layer-wise LR decay); otherwise timm's, which skip requires_grad=False
    # parameters, so EMA targets are never optimized.
    groups = model.param_groups(cfg.weight_decay) if isinstance(model, Method) else None
    return create_optimizer_v2(
        groups if groups is not None else model, opt=cfg.name, lr=scaled_lr(cfg, global_batch),
        weight_decay=cfg.weight_decay, filter_bias_and_bn=True, **kwargs,
    )


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> CosineLRScheduler:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return CosineLRScheduler(
        opt, t_initial=max(total_steps - warmup, 1), lr_min=cfg.min_lr, warmup_t=warmup, warmup_lr_init=0.0,
        warmup_prefix=True, t_in_epochs=False,
    )


def weight_decay_at(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Cosine weight-decay schedule from weight_decay to weight_decay_end (I-JEPA: 0.04 → 0.4)."""
    if cfg.weight_decay_end is None:
        return cfg.weight_decay
    k = min(max(step, 0), total_steps)
    start, end = cfg.weight_decay, cfg.weight_decay_end
    return end - (end - start) * (1 + math.cos(math.pi * k / total_steps)) / 2


def apply_weight_decay(opt: torch.optim.Optimizer, value: float) -> None:
    for group in opt.param_groups:
        if group.get("weight_decay", 0.0) > 0.0:  # the no-decay group (biases, norms) stays at zero
            group["weight_decay"] = value
