"""The EMA ("momentum") target network shared by BYOL, I-JEPA and DoRA.

The target never receives gradients: its parameters have requires_grad=False and are only moved by
`update`, target ← τ·target + (1−τ)·online, with buffers (BatchNorm statistics) copied.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn


def cosine_tau(step: int, total_steps: int, base: float) -> float:
    """BYOL's schedule: τ = 1 − (1 − τ_base)(cos(πk/K) + 1)/2, from τ_base at k=0 to 1 at k=K."""
    k = min(max(step, 0), total_steps)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * k / total_steps) + 1.0) / 2.0


def linear_tau(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """I-JEPA's schedule: τ rises linearly from `base` to `final` over training."""
    k = min(max(step, 0), total_steps)
    return base + (final - base) * k / total_steps


def make_target(online: nn.Module) -> nn.Module:
    """A frozen deep copy of `online` that only `ema_update` changes."""
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    t_params: list[torch.Tensor] = list(target.parameters())
    o_params: list[torch.Tensor] = [p.detach() for p in online.parameters()]
    if len(t_params) != len(o_params):
        raise RuntimeError("target and online networks differ in structure")
    torch._foreach_lerp_(t_params, o_params, 1.0 - tau)
    for bt, bo in zip(target.buffers(), online.buffers(), strict=True):
        bt.copy_(bo)
