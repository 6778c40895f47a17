"""A step that goes non-finite leaves the model exactly as it was.

Skipping `optimizer.step()` is not enough: the forward pass already moved BatchNorm's running statistics
(of the online network and of an EMA target run in train mode), and an EMA update after it would copy them
into the target. So the guard copies every buffer before the forward pass, and when the global gradient is
not finite it puts them back and tells the loop to skip both the update and the method's `on_step_end`.
Gradients are all-reduced before the check, so every rank decides the same.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class StepGuard:
    def __init__(self, module: nn.Module, clip_grad_norm: float | None = None) -> None:
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.clip = clip_grad_norm
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.last_norm = float("nan")

    def before_forward(self) -> None:
        """Copy the buffers the forward pass may change (BatchNorm running mean/var and batch counts)."""
        self._saved = [(b, b.detach().clone()) for b in self.module.buffers()]

    def after_backward(self) -> bool:
        """True: take the step (gradients finite, clipped when configured). False: the buffers are restored
        and this step must not change anything else."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return True
        if self.clip is not None:
            norm = nn.utils.clip_grad_norm_(self.params, self.clip, error_if_nonfinite=False)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        self.last_norm = float(norm)
        if torch.isfinite(norm):
            return True
        with torch.no_grad():
            for live, saved in self._saved:
                live.copy_(saved)
        for p in self.params:
            p.grad = None
        return False
