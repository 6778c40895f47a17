"""DINO — self-distillation with no labels (Caron et al., 2021, "Emerging Properties in Self-Supervised Vision
Transformers", https://arxiv.org/abs/2104.14294). Settings and their sources: docs/DORA-NOTES.md section 1.

Student: a timm backbone ([CLS] feature for ViTs, pooled feature for CNNs) + DINOHead. Teacher: an EMA copy of
both that never receives gradients; its momentum follows a cosine from `method.momentum[0]` to `[1]` over
`train.steps`. The teacher sees the two global crops, the student every crop (globals at `model.image_size`,
`local_crops` locals at `local_size`); the loss is the cross-entropy of the centred, sharpened teacher
distribution of each global crop against the student's distribution of every other crop (raysl.methods.dino_parts).

Schedules count optimiser steps; their length is `train.steps` (the loop passes it to `on_step_end`; the teacher
temperature warm-up and the prototype freeze default to 10% and 1% of it, as 30 of 300 and 1 of 100 epochs in the
paper). The step index comes from `collate` (the loop's step about to run), so a resumed run continues its
schedules. Per step: forward (under bf16 autocast on GPU; the loop uses no GradScaler, so gradients are never
scaled) → backward → each parameter's gradient clipped on its own to `clip_grad` → the last layer's gradients
dropped while frozen → the loop's optional global clip (`optim.clip_grad_norm`) and non-finite check → AdamW step
→ `on_step_end`: EMA update. The paper's weight decay 0.04 → 0.4 (cosine, per step) is the loop's
`optim.weight_decay` / `optim.weight_decay_end` (raysl/configs/dino.yaml sets them).

ViT students get timm's `dynamic_img_size` (position embeddings interpolated for the smaller local crops) and
DINO's drop-path 0.1 unless `model.backbone_kwargs` says otherwise; the teacher never drops paths.
The registered encoder is the teacher's backbone, the network the paper evaluates.

Data: images, or video (files or clip shards, raysl.methods.video_source), where every decoded frame of a clip is
one image sample (raysl.data.frames).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

from raysl.config import PretrainConfig
from raysl.config_ssl import DINOConfig, SelfDistillConfig
from raysl.data.multicrop import GLOBAL_CROPS, MultiCrop, crop_columns
from raysl.data.views import normalize
from raysl.methods.base import BatchFn, backbone_kwargs, method_config, register
from raysl.methods.dino_parts import (
    DINOHead,
    DINOLoss,
    clip_each_gradient,
    cosine,
    drop_last_layer_gradients,
    teacher_temperature,
)
from raysl.methods.momentum import ema_update, make_target
from raysl.methods.video_source import VideoSource
from raysl.models.backbones import create_backbone, timm_args

LOCAL_SHARE = 96 / 224  # the paper's local crops: 96 px beside 224-px globals
TEMP_WARMUP_SHARE = 0.1  # 30 of 300 epochs
FREEZE_SHARE = 0.01  # 1 of 100 epochs
VIT_DROP_PATH = 0.1  # the student's stochastic depth (main_dino.py)


def share(steps: int, fraction: float) -> int:
    """`fraction` of `steps`, rounded half up."""
    return int(steps * fraction + 0.5)


def is_vit(cfg: PretrainConfig) -> bool:
    """A backbone built at a fixed image size (a ViT-style patch grid), by the rule create_backbone uses."""
    return "img_size" in timm_args(cfg.model.backbone, cfg.model.image_size, None, {})


def patch_size(cfg: PretrainConfig) -> int | None:
    """A ViT's patch side: `model.patch_size`, else the `patchN` in the timm name; None for CNNs."""
    if not is_vit(cfg):
        return None
    if cfg.model.patch_size is not None:
        return cfg.model.patch_size
    found = re.search(r"patch(\d+)", cfg.model.backbone)
    return int(found.group(1)) if found else None


def local_size(cfg: PretrainConfig, fraction: float = LOCAL_SHARE) -> int:
    """`method.local_size`, else `fraction` (DINO: 96/224) of `model.image_size`, a whole number of patches (at
    least one)."""
    m = method_config(cfg, SelfDistillConfig)
    if m.local_size is not None:
        return m.local_size
    p = patch_size(cfg) or 1
    return max(p, round(cfg.model.image_size * fraction / p) * p)


def student_kwargs(cfg: PretrainConfig) -> dict[str, Any]:
    kwargs = backbone_kwargs(cfg)
    if is_vit(cfg):
        kwargs.setdefault("dynamic_img_size", True)  # globals and locals differ in size
        kwargs.setdefault("drop_path_rate", VIT_DROP_PATH)
    return kwargs


def without_dropout(module: nn.Module) -> nn.Module:
    """The teacher: no drop-path or dropout (the paper builds it without), yet train-mode BatchNorm as the student."""
    for m in module.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0
        elif isinstance(m, nn.Dropout):
            m.p = 0.0
    return module


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the entropy of softmax(logits), in nats (log K: uniform; 0: one-hot)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


@register
class DINO(VideoSource):
    name = "dino"
    #: the default config's columns; a config's own are `crop_columns(method.local_crops)`
    batch_columns = crop_columns(DINOConfig().local_crops)

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        m, mc, steps = method_config(cfg, SelfDistillConfig), cfg.model, cfg.train.steps
        self.mean, self.std = mc.mean, mc.std
        self.columns = crop_columns(m.local_crops)
        self.backbone = create_backbone(mc.backbone, cifar_stem=mc.cifar_stem, image_size=mc.image_size,
                                        patch_size=mc.patch_size, **student_kwargs(cfg))
        self.head = DINOHead(int(self.backbone.num_features), m.out_dim, m.hidden_dim,  # type: ignore[arg-type]
                             m.bottleneck_dim, m.norm_last_layer, m.head_bn)
        self.teacher_backbone = without_dropout(make_target(self.backbone))
        self.teacher_head = make_target(self.head)
        self.loss_fn = DINOLoss(m.out_dim, m.student_temp, m.center_momentum)
        self.teacher_temp = m.teacher_temp
        self.temp_warmup = (m.teacher_temp_warmup_steps if m.teacher_temp_warmup_steps is not None
                            else share(steps, TEMP_WARMUP_SHARE))
        self.freeze_steps = (m.freeze_last_layer_steps if m.freeze_last_layer_steps is not None
                             else share(steps, FREEZE_SHARE))
        self.momentum = m.momentum
        self.clip_grad = m.clip_grad
        self.steps_done = 0  # updates so far: the schedules' index (main_dino.py's `it`)

    @classmethod
    def build(cls, cfg: PretrainConfig) -> DINO:
        cls.check_config(cfg)
        return cls(cfg)

    @classmethod
    def check_config(cls, cfg: PretrainConfig) -> None:
        super().check_config(cfg)
        m, size = method_config(cfg, SelfDistillConfig), cfg.model.image_size
        local, p = cls.local_size(cfg), patch_size(cfg)
        if m.local_crops and local > size:
            raise ValueError(f"method.local_size: {local} is larger than model.image_size {size}; allowed: 8 to "
                             f"{size} (local crops are the small ones)")
        if m.local_crops and p and local % p:
            raise ValueError(f"method.local_size: {local} is not a multiple of the patch size {p} of "
                             f"{cfg.model.backbone!r}; allowed: multiples of {p} up to {size}")
        lo, hi = m.momentum
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"method.momentum: need 0 <= start <= end <= 1, got ({lo}, {hi})")
        if min(m.teacher_temp) <= 0:
            raise ValueError(f"method.teacher_temp: temperatures must be > 0, got {m.teacher_temp}")
        for name in ("blur_p", "solarize_p"):
            if not all(0 <= v <= 1 for v in getattr(m, name, ())):
                raise ValueError(f"method.{name}: probabilities must be in [0, 1], got {getattr(m, name)}")

    @classmethod
    def local_size(cls, cfg: PretrainConfig) -> int:
        """The local crops' side (a subclass may size them otherwise)."""
        return local_size(cfg)

    @classmethod
    def view_transform(cls, cfg: PretrainConfig) -> BatchFn:
        return MultiCrop(cfg.model.image_size, local_size(cfg), cfg.data.max_image_pixels,
                         method_config(cfg, DINOConfig))

    def collate(self, batch: dict[str, torch.Tensor], step: int, rank: int) -> dict[str, torch.Tensor]:
        self.steps_done = step - 1  # `step` is the one about to run; a resumed run picks up its schedules here
        return batch

    def temperature(self) -> float:
        return teacher_temperature(self.steps_done, self.temp_warmup, *self.teacher_temp)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        crops = [normalize(batch[c], self.mean, self.std) for c in self.columns]
        glob = torch.cat(crops[:GLOBAL_CROPS])  # crops of one size pass together (BatchNorm statistics per size)
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(glob)).chunk(GLOBAL_CROPS)
        features = [self.backbone(glob)]
        if len(crops) > GLOBAL_CROPS:
            features.append(self.backbone(torch.cat(crops[GLOBAL_CROPS:])))
        student = self.head(torch.cat(features)).chunk(len(crops))
        temp = self.temperature()
        with torch.no_grad():  # before the loss, which moves the centre this step's targets used
            t_entropy = mean_entropy((torch.cat(teacher).float() - self.loss_fn.center) / temp)
            s_entropy = mean_entropy(torch.cat(student).detach().float() / self.loss_fn.student_temp)
        loss = self.loss_fn(student, teacher, temp)
        return {"loss": loss, "teacher_temp": loss.new_tensor(temp), "teacher_entropy": t_entropy,
                "student_entropy": s_entropy}

    def student_parameters(self) -> list[nn.Parameter]:
        return [p for p in (*self.backbone.parameters(), *self.head.parameters()) if p.requires_grad]

    def forward_backward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = model(batch)
        out["loss"].backward()
        # DDP has averaged the gradients by now; there is no loss scaling to undo (bf16 autocast only).
        if self.clip_grad is not None:
            clip_each_gradient(self.student_parameters(), self.clip_grad)
        drop_last_layer_gradients(self.head, self.steps_done, self.freeze_steps)
        return out

    def teacher_momentum(self, step: int, total_steps: int) -> float:
        """The momentum of the update after `step` updates (1-based), main_dino.py's `momentum_schedule[it]`."""
        return cosine(step - 1, total_steps, *self.momentum)

    def on_step_end(self, step: int, total_steps: int) -> dict[str, float]:
        m = self.teacher_momentum(step, total_steps)
        ema_update(self.teacher_backbone, self.backbone, m)
        ema_update(self.teacher_head, self.head, m)
        self.steps_done = step
        return {"teacher_momentum": m}

    def encoder(self) -> nn.Module:
        return self.teacher_backbone
