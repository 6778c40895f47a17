"""BYOL — Bootstrap Your Own Latent (Grill et al., 2020, https://arxiv.org/abs/2006.07733).

Online network: backbone → projector → predictor. Target network: backbone → projector, an EMA of the
online one that never receives gradients. Loss: 2 − 2·cos(q, z′), symmetrized over both view orders.
No negative pairs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from raysl.config import BYOLConfig, PretrainConfig
from raysl.data.views import TwoViews, normalize, two_view_specs
from raysl.methods.base import BatchFn, Method, backbone_kwargs, device_views_for, method_config, register
from raysl.methods.momentum import cosine_tau, ema_update, make_target
from raysl.models.backbones import create_backbone
from raysl.models.heads import mlp


def regression_loss(q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample ‖q̄ − z̄‖² = 2 − 2·cos(q, z) for (B, D) inputs; z is a target, so no gradient."""
    return 2.0 - 2.0 * F.cosine_similarity(q, z.detach(), dim=-1)


def byol_loss(q1: torch.Tensor, q2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetrized loss of the paper: view 1's prediction → view 2's target, plus the swap."""
    return (regression_loss(q1, z2) + regression_loss(q2, z1)).mean()


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Std over the batch of L2-normalized projections, averaged over dims; → 0 on collapse, ≈1/√D healthy."""
    return F.normalize(z.detach().float(), dim=-1).std(dim=0).mean()


@register
class BYOL(Method):
    name = "byol"
    batch_columns = ("view1", "view2")
    augments_on_device = True

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        m, mc = method_config(cfg, BYOLConfig), cfg.model
        self.mean, self.std = mc.mean, mc.std
        self.tau_base = m.tau_base
        self.tau = m.tau_base
        self.backbone = create_backbone(mc.backbone, cifar_stem=mc.cifar_stem, image_size=mc.image_size,
                                        patch_size=mc.patch_size, **backbone_kwargs(cfg))
        dim = int(self.backbone.num_features)  # type: ignore[arg-type]
        self.projector = mlp(dim, m.projector_hidden, m.projector_dim)
        self.predictor = mlp(m.projector_dim, m.predictor_hidden, m.projector_dim)
        self.target_backbone = make_target(self.backbone)
        self.target_projector = make_target(self.projector)
        self.device_views = device_views_for(cfg, two_view_specs(mc.image_size, **self._augment(cfg)))

    @classmethod
    def build(cls, cfg: PretrainConfig) -> BYOL:
        return cls(cfg)

    @classmethod
    def view_transform(cls, cfg: PretrainConfig) -> BatchFn:
        return TwoViews(cfg.model.image_size, cfg.data.max_image_pixels, on=cfg.data.augment_on,
                        decode_side=cfg.data.gpu_decode_size, **cls._augment(cfg))

    @staticmethod
    def _augment(cfg: PretrainConfig) -> dict[str, Any]:
        v = method_config(cfg, BYOLConfig).views
        return {"crop_scale": v.crop_scale, "flip_p": v.flip_p, "jitter": (v.brightness, v.contrast, v.saturation,
                v.hue), "jitter_p": v.jitter_p, "gray_p": v.gray_p, "blur_p": v.blur_p, "solarize_p": v.solarize_p}

    def _online(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.projector(self.backbone(x))  # (B, D)
        return z, self.predictor(z)

    @torch.no_grad()
    def _target(self, x: torch.Tensor) -> torch.Tensor:
        return self.target_projector(self.target_backbone(x))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x1 = normalize(batch["view1"], self.mean, self.std)  # (B, 3, H, W)
        x2 = normalize(batch["view2"], self.mean, self.std)
        # Each view passes separately so BatchNorm statistics are per view, as in the paper's code.
        z1, q1 = self._online(x1)
        z2, q2 = self._online(x2)
        t1, t2 = self._target(x1), self._target(x2)
        loss = byol_loss(q1, q2, t1, t2)
        return {"loss": loss, "embedding_std": embedding_std(z1)}

    def on_step_end(self, step: int, total_steps: int) -> dict[str, float]:
        # τ for the update after step k follows the paper's cosine schedule.
        self.tau = cosine_tau(step, total_steps, self.tau_base)
        ema_update(self.target_backbone, self.backbone, self.tau)
        ema_update(self.target_projector, self.projector, self.tau)
        return {"tau": self.tau}

    def encoder(self) -> nn.Module:
        return self.backbone
