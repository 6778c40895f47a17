"""CLIP — Contrastive Language-Image Pre-training (Radford et al., 2021, https://arxiv.org/abs/2103.00020),
with SigLIP's sigmoid loss as an option (Zhai et al., 2023, https://arxiv.org/abs/2303.15343).

Image tower: any timm model, pooled features → linear projection. Text tower: a causal transformer over
the BPE tokens, pooled at the end-of-text token → linear projection. Both are L2-normalized and scored
with a learnable temperature (logit scale starts at 1/0.07 and is clamped at 100) over the *global*
batch (see contrastive.py). With `micro_batches` > 1 the step uses feature caching (GradCache, Gao et
al., 2021, https://arxiv.org/abs/2101.06983), so the global batch does not depend on memory.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from raysl.config import CLIPConfig, PretrainConfig
from raysl.data.views import ImageText, normalize, one_view_spec
from raysl.methods.base import BatchFn, Method, backbone_kwargs, device_views_for, method_config, register
from raysl.methods.contrastive import all_reduce_grads, clip_loss, siglip_loss
from raysl.models.backbones import create_backbone
from raysl.models.heads import TextTower


@register
class CLIP(Method):
    name = "clip"
    required_columns = frozenset({"image", "caption"})
    batch_columns = ("image", "text")
    augments_on_device = True
    export_full = True

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        m, mc = method_config(cfg, CLIPConfig), cfg.model
        self.mean, self.std = mc.mean, mc.std
        self.loss_kind, self.micro_batches, self.loss_chunk = m.loss, m.micro_batches, m.loss_chunk
        self.max_log_scale = math.log(m.max_logit_scale)
        self.device_views = device_views_for(cfg, one_view_spec(mc.image_size, crop_scale=m.crop_scale,
                                                                flip_p=m.flip_p))
        self.visual = create_backbone(mc.backbone, cifar_stem=mc.cifar_stem, image_size=mc.image_size,
                                      patch_size=mc.patch_size, **backbone_kwargs(cfg))
        self.visual_proj = nn.Linear(int(self.visual.num_features), m.embed_dim, bias=False)  # type: ignore[arg-type]
        self.text = TextTower(m.context_length, m.text_width, m.text_heads, m.text_layers, m.embed_dim)
        # Stored as a log so the optimizer moves it multiplicatively, as in the paper.
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / m.init_temperature)))
        self.bias = nn.Parameter(torch.tensor(m.init_bias)) if m.loss == "sigmoid" else None

    @classmethod
    def default_model_name(cls) -> str:
        return "raysl-clip"  # both towers, not an encoder alone

    @classmethod
    def build(cls, cfg: PretrainConfig) -> CLIP:
        return cls(cfg)

    @classmethod
    def view_transform(cls, cfg: PretrainConfig) -> BatchFn:
        m = method_config(cfg, CLIPConfig)
        return ImageText(cfg.model.image_size, cfg.data.max_image_pixels, crop_scale=m.crop_scale,
                         flip_p=m.flip_p, context_length=m.context_length, on=cfg.data.augment_on,
                         decode_side=cfg.data.gpu_decode_size)

    def logit_scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=self.max_log_scale).exp()

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) → (B, E), unit length."""
        x = normalize(images, self.mean, self.std).to(self.visual_proj.weight.dtype)
        return F.normalize(self.visual_proj(self.visual(x)), dim=-1)

    def embed_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """int (B, L) → (B, E), unit length."""
        return F.normalize(self.text(tokens.long()), dim=-1)

    def loss_from_features(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            return siglip_loss(img, txt, self.logit_scale(), self.bias, chunk=self.loss_chunk)
        return clip_loss(img, txt, self.logit_scale(), chunk=self.loss_chunk)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        img, txt = self.embed_images(batch["image"]), self.embed_texts(batch["text"])
        return self._outputs(self.loss_from_features(img, txt), img, txt)

    def _outputs(self, loss: torch.Tensor, img: torch.Tensor, txt: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            # Local in-batch image→text top-1: a cheap health signal next to the loss.
            acc = ((img @ txt.T).argmax(dim=1) == torch.arange(len(img), device=img.device)).float().mean()
        return {"loss": loss, "logit_scale": self.logit_scale().detach(), "batch_i2t_top1": acc}

    def forward_backward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.micro_batches == 1:
            return super().forward_backward(model, batch)
        return self.cached_step(batch)

    def cached_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """GradCache: the loss over the whole batch, with activations held for one micro-batch at a time.

        1. embed every micro-batch without a graph; 2. the global loss on those cached features, and its
        gradient w.r.t. them (and the temperature); 3. re-embed each micro-batch with a graph and
        back-propagate the cached feature gradients through it. Gradients are then averaged over workers
        here, since DDP's per-forward hooks are bypassed. Towers must be deterministic between passes
        (no dropout), as they are by default.
        """
        images, texts = batch["image"].chunk(self.micro_batches), batch["text"].chunk(self.micro_batches)
        with torch.no_grad():
            img = torch.cat([self.embed_images(x) for x in images])  # (B, E)
            txt = torch.cat([self.embed_texts(t) for t in texts])
        img.requires_grad_(True)
        txt.requires_grad_(True)
        loss = self.loss_from_features(img, txt)
        loss.backward()  # → img.grad, txt.grad, and the temperature's (and bias's) gradient
        assert img.grad is not None and txt.grad is not None
        for x, t, gi, gt in zip(images, texts, img.grad.split([len(x) for x in images]),
                                txt.grad.split([len(t) for t in texts]), strict=True):
            surrogate = (self.embed_images(x) * gi).sum() + (self.embed_texts(t) * gt).sum()
            surrogate.backward()
        all_reduce_grads([p for p in self.parameters() if p.requires_grad])
        return self._outputs(loss.detach(), img.detach(), txt.detach())

    def on_step_end(self, step: int, total_steps: int) -> dict[str, float]:
        with torch.no_grad():  # the paper clips the scale at 100 so training stays stable
            self.log_scale.clamp_(max=self.max_log_scale)
        return {}

    def online_metrics(self, data: dict[str, Any]) -> dict[str, float]:
        from raysl.eval.zero_shot import evaluate

        return evaluate(self, data, self.text.context_length)

    def encoder(self) -> nn.Module:
        """The image tower, what image-only downstream jobs (probe, fine-tune, detection) take."""
        return self.visual
