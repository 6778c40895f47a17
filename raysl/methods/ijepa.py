"""I-JEPA — Image-based Joint-Embedding Predictive Architecture (Assran et al., 2023,
https://arxiv.org/abs/2301.08243).

A ViT context encoder sees only the visible context patches (masking after patch + position embedding,
before the blocks, so compute falls with the mask). An EMA target encoder sees the whole image without
gradients; its layer-normed outputs at the target blocks are what a narrow ViT predictor must predict
from the context plus mask tokens at the target positions. Loss: mean squared (L2) distance over all
target patches (smooth-L1 as in the reference code, optionally). The target encoder is the one that is
registered and evaluated, with average-pooled patch features.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from raysl.config import IJEPAConfig, PretrainConfig
from raysl.data.masks import MaskSpec, sample_masks
from raysl.data.views import OneView, normalize, one_view_spec
from raysl.eval.knn import split_knn
from raysl.methods.base import BatchFn, Method, backbone_kwargs, device_views_for, method_config, register
from raysl.methods.momentum import ema_update, linear_tau, make_target
from raysl.models.backbones import create_backbone
from raysl.models.heads import JEPAPredictor


def vit_tokens(vit: Any, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Patch tokens (B, K, D) of a timm ViT that only processes the patches at indices `keep` (B, K).

    Prefix tokens (class / register) are kept through the blocks, as the ViT was built, and dropped from
    the output, so indices always address patches, never the class token.
    """
    prefix = int(getattr(vit, "num_prefix_tokens", 0))
    h = vit._pos_embed(vit.patch_embed(x))  # (B, P+N, D), positions added before any masking
    if keep is not None:
        patches = h[:, prefix:]
        patches = torch.gather(patches, 1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        h = torch.cat([h[:, :prefix], patches], dim=1)
    h = vit.norm(vit.blocks(vit.norm_pre(vit.patch_drop(h))))
    return h[:, prefix:]


def fix_sincos_positions(vit: Any) -> None:
    """Fixed 2-D sin-cos patch positions, not learned, as in the reference I-JEPA (and MAE) encoders.

    A learned table starts random and, on small grids, explains a large share of the token variance, which
    the predictor can match from positions alone; fixed positions leave content as what must be learned.
    Prefix tokens (class token) get zeros.
    """
    from timm.layers import build_sincos2d_pos_embed

    pos = getattr(vit, "pos_embed", None)
    if not isinstance(pos, nn.Parameter):
        return
    grid = list(vit.patch_embed.grid_size)
    table = build_sincos2d_pos_embed(grid, dim=pos.shape[-1]).reshape(1, grid[0] * grid[1], -1)
    with torch.no_grad():
        pos.zero_()
        pos[:, pos.shape[1] - table.shape[1] :] = table.to(pos.dtype)
    pos.requires_grad_(False)


def gather_blocks(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, D), idx (B, M, T) → (B, M, T, D)."""
    b, m, t = idx.shape
    flat = torch.gather(tokens, 1, idx.reshape(b, m * t, 1).expand(-1, -1, tokens.shape[-1]))
    return flat.reshape(b, m, t, -1)


@register
class IJEPA(Method):
    name = "ijepa"
    batch_columns = ("image",)
    augments_on_device = True
    # The paper evaluates average-pooled patch features; fc_norm=False keeps timm's final LayerNorm on
    # every token (what the loss sees) instead of moving it after the pooling.
    encoder_defaults = {"global_pool": "avg", "fc_norm": False}

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        m, mc = method_config(cfg, IJEPAConfig), cfg.model
        self.mean, self.std, self.seed = mc.mean, mc.std, cfg.train.seed
        self.momentum = m.momentum
        self.loss_kind = m.loss
        self.spec = MaskSpec(num_targets=m.num_targets, target_scale=m.target_scale, target_aspect=m.target_aspect,
                             context_scale=m.context_scale, min_keep=m.min_keep)
        self.context_encoder = create_backbone(mc.backbone, image_size=mc.image_size, patch_size=mc.patch_size,
                                               **backbone_kwargs(cfg))
        if not hasattr(self.context_encoder, "patch_embed"):
            raise ValueError(f"model.backbone: I-JEPA needs a ViT (timm vit_*/deit_*), not {mc.backbone!r}")
        if m.sincos_positions:
            fix_sincos_positions(self.context_encoder)
        self.grid: tuple[int, int] = tuple(self.context_encoder.patch_embed.grid_size)  # type: ignore[union-attr,arg-type,assignment]
        dim = int(self.context_encoder.num_features)  # type: ignore[arg-type]
        self.predictor = JEPAPredictor(self.grid, dim, m.predictor_width, m.predictor_depth, m.predictor_heads)
        self.target_encoder = make_target(self.context_encoder)
        self.tau = m.momentum[0]
        self.export_encoder = m.export_encoder
        self.knn_k = cfg.eval.k  # the shared online kNN's k, so the two encoders' scores compare
        self.device_views = device_views_for(cfg, one_view_spec(cfg.model.image_size, crop_scale=m.crop_scale,
                                                                flip_p=m.flip_p))

    @classmethod
    def build(cls, cfg: PretrainConfig) -> IJEPA:
        return cls(cfg)

    @classmethod
    def view_transform(cls, cfg: PretrainConfig) -> BatchFn:
        m = method_config(cfg, IJEPAConfig)
        return OneView(cfg.model.image_size, cfg.data.max_image_pixels, crop_scale=m.crop_scale, flip_p=m.flip_p,
                       on=cfg.data.augment_on, decode_side=cfg.data.gpu_decode_size)

    def collate(self, batch: dict[str, torch.Tensor], step: int, rank: int) -> dict[str, torch.Tensor]:
        n = len(batch["image"] if "image" in batch else batch["decoded"])  # decoded: its views come on the device
        ctx, tgt = sample_masks(self.seed, rank, step, n, self.grid, self.spec)
        return {**batch, "context_idx": torch.from_numpy(ctx), "target_idx": torch.from_numpy(tgt)}

    @torch.no_grad()
    def targets(self, x: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        h = vit_tokens(self.target_encoder, x)  # (B, N, D), whole image
        h = F.layer_norm(h, h.shape[-1:])
        return gather_blocks(h, target_idx)  # (B, M, T, D)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = normalize(batch["image"], self.mean, self.std)  # (B, 3, H, W)
        ctx_idx, tgt_idx = batch["context_idx"], batch["target_idx"]
        target = self.targets(x, tgt_idx)
        ctx = vit_tokens(self.context_encoder, x, keep=ctx_idx)  # (B, K, D) — only visible patches
        pred = self.predictor(ctx, ctx_idx, tgt_idx)  # (B, M, T, D)
        if self.loss_kind == "l2":
            loss = F.mse_loss(pred.float(), target.float())
        else:
            loss = F.smooth_l1_loss(pred.float(), target.float())
        n = self.grid[0] * self.grid[1]
        return {"loss": loss, "context_fraction": torch.tensor(ctx_idx.shape[1] / n),
                "target_std": target.float().std(dim=(0, 1, 2)).mean()}

    def on_step_end(self, step: int, total_steps: int) -> dict[str, float]:
        self.tau = linear_tau(step, total_steps, self.momentum[0], self.momentum[1])
        ema_update(self.target_encoder, self.context_encoder, self.tau)
        return {"tau": self.tau}

    def online_metrics(self, data: dict[str, Any]) -> dict[str, float]:
        """The shared kNN follows the exported encoder; this adds the other one. In short runs the EMA target
        lags the context encoder (it averages weights from the early steps, whose features are worst)."""
        other = "context" if self.export_encoder == "target" else "target"
        enc: nn.Module = getattr(self, f"{other}_encoder")
        device = next(self.context_encoder.parameters()).device
        labels = torch.as_tensor(np.asarray(data["label"]), dtype=torch.long)
        return {f"{other}_knn_top1": split_knn(enc, np.asarray(data["image"]), labels, self.mean, self.std, device,
                                                     self.knn_k)}

    def encoder(self) -> nn.Module:
        return self.target_encoder if self.export_encoder == "target" else self.context_encoder
