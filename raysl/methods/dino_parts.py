"""DINO's projection head, loss and schedules: the parts DINO and DoRA share.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", arXiv 2104.14294 (Sec. 3.1, App.).
Settings and their sources are collected in docs/DORA-NOTES.md. Used by raysl/methods/dino.py (and DoRA); tested on
their own in tests/unit/test_dino_parts.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """MLP (in → hidden → hidden → bottleneck, GELU; `use_bn`: BatchNorm before each GELU), L2-normalised
    bottleneck, then a weight-normalised linear layer to `out_dim` prototypes without bias. `norm_last_layer`: the
    weight-norm gain is fixed at 1, so every prototype has unit norm and each logit is a cosine similarity (the
    paper's default for ViT-B; ViT-S trains it).

    The parametrized weight norm, not `nn.utils.weight_norm`: the legacy hook cannot be deep-copied on torch 2.14,
    and the teacher is a copy of the student."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 norm_last_layer: bool = True, use_bn: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for d in (in_dim, hidden_dim):  # no Identity placeholders: without BatchNorm the parameter names stay put
            layers += [nn.Linear(d, hidden_dim), *([nn.BatchNorm1d(hidden_dim)] if use_bn else []), nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))  # type: ignore[no-any-return]

    def last_layer_parameters(self) -> list[nn.Parameter]:
        return list(self.last_layer.parameters())


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher distribution of each global view and the student's
    distribution of every other view (same-view pairs skipped), averaged over pairs and the batch. The centre is an
    EMA of the teacher's raw outputs, updated after the loss, so each step uses the previous centre."""

    center: torch.Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                teacher_temp: float) -> torch.Tensor:
        """`student`: one (B, K) output per view, the teacher's views first (same order); `teacher`: one per
        global view."""
        if len(student) < 2 or not teacher or len(teacher) > len(student):
            raise ValueError(f"DINO loss: {len(student)} student and {len(teacher)} teacher views; the student needs "
                             "at least 2 and at least as many as the teacher")
        targets = [F.softmax((t.detach().float() - self.center) / teacher_temp, dim=-1) for t in teacher]
        logs = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student]
        total, pairs = torch.zeros((), device=logs[0].device), 0
        for a, target in enumerate(targets):
            for v, log_p in enumerate(logs):
                if v != a:  # a view is never its own target
                    total = total + (-target * log_p).sum(dim=-1).mean()
                    pairs += 1
        self.update_center(teacher)
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher: Sequence[torch.Tensor]) -> None:
        out = torch.cat([t.detach().float() for t in teacher])
        batch_sum, count = out.sum(dim=0, keepdim=True), torch.tensor(float(len(out)), device=out.device)
        if dist.is_available() and dist.is_initialized():  # the mean over every worker's batch, as the paper
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)


def cosine(step: int, total: int, start: float, end: float) -> float:
    """`start` at step 0 to `end` at step `total` along half a cosine (teacher momentum 0.996 → 1, weight decay
    0.04 → 0.4); `end` after `total`."""
    if total <= 0 or step >= total:
        return end
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * step / total))


def teacher_temperature(epoch: float, warmup_epochs: float = 30, start: float = 0.04, end: float = 0.07) -> float:
    """Linear warm-up of the teacher temperature from `start` to `end` over `warmup_epochs`, then `end` (Sec. 4)."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return end
    return start + (end - start) * max(epoch, 0.0) / warmup_epochs


def clip_each_gradient(parameters: Iterable[nn.Parameter], max_norm: float) -> None:
    """DINO's clipping: each parameter's gradient is rescaled to `max_norm` on its own when its L2 norm exceeds it
    (not one global norm over all parameters). The factors min(1, max_norm / norm) stay on the device: no host sync
    per parameter (a ViT-S has ~150 tensors). A non-finite gradient stays non-finite, for the loop's step guard."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
    factors = (max_norm / (norms + 1e-6)).clamp_(max=1.0)
    for g, f in zip(grads, factors.unbind(), strict=True):
        g.mul_(f.to(g.dtype))


def drop_last_layer_gradients(head: DINOHead, epoch: float, freeze_epochs: float) -> None:
    """During the first `freeze_epochs`, the prototypes are not updated: their gradients are dropped after the
    backward pass, so the optimiser skips them (the paper's remedy for early instability)."""
    if epoch < freeze_epochs:
        for p in head.last_layer_parameters():
            p.grad = None
