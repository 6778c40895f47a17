"""What the downstream tasks (classification fine-tuning, detection) share: the encoder they start from —
the registered one (`init: pretrained`, its safetensors read from run storage) or the same network at
random init — an optional frozen-encoder warm-up, and layer-wise LR decay over timm's layer groups."""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from safetensors.torch import load as load_safetensors
from timm.optim import param_groups_layer_decay

from raysl.config import PretrainConfig
from raysl.config_tasks import DownstreamConfig
from raysl.methods.base import backbone_kwargs
from raysl.models.backbones import create_backbone
from raysl.storage import read_bytes, redact


def start_encoder(cfg: PretrainConfig, task: DownstreamConfig) -> nn.Module:
    """The encoder a task starts from. Random init always runs first, so the parameters built after it (the
    head) draw the same random numbers whether or not pretrained weights then replace the encoder's."""
    mc = cfg.model
    encoder = create_backbone(mc.backbone, cifar_stem=mc.cifar_stem, image_size=mc.image_size,
                              patch_size=mc.patch_size, **backbone_kwargs(cfg))
    if task.init == "pretrained":
        if task.init_weights is None:
            raise ValueError("method.init=pretrained needs method.init_weights (raysl finetune sets it)")
        state = load_safetensors(read_bytes(task.init_weights))  # safetensors: tensors only, nothing unpickled
        try:
            encoder.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"the weights at {redact(task.init_weights)} do not fit model.backbone "
                             f"{mc.backbone!r}: {exc}") from None
    return encoder


def frozen_at(task: DownstreamConfig, step: int) -> bool:
    """Whether the encoder is frozen for `step` (counted from 1, as the loop counts)."""
    return step <= task.freeze_steps


def layer_decay_groups(encoder: nn.Module, model: nn.Module, weight_decay: float,
                       layer_decay: float | None) -> list[dict[str, Any]] | None:
    """timm's layer-decayed groups for the encoder (each with an `lr_scale`), and the rest of `model` (the
    head, a detector's pyramid and heads) at full LR; None without layer decay (the default groups)."""
    if layer_decay is None:
        return None
    skip = set(getattr(encoder, "no_weight_decay", lambda: set())())
    groups: list[dict[str, Any]] = param_groups_layer_decay(encoder, weight_decay=weight_decay,
                                                            no_weight_decay_list=skip, layer_decay=layer_decay)
    # timm gives the encoder's top block scale 1 (a headless model has no layer above it); as in BEiT/MAE the
    # head is the top layer here, so every encoder layer sits one step further down.
    for g in groups:
        g["lr_scale"] = g.get("lr_scale", 1.0) * layer_decay
    mine = {id(p) for p in encoder.parameters()}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in mine]
    # As timm's default groups: biases and norm weights (1-D) without weight decay.
    groups.append({"params": [p for p in rest if p.ndim > 1], "weight_decay": weight_decay, "lr_scale": 1.0})
    groups.append({"params": [p for p in rest if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": 1.0})
    return [g for g in groups if g["params"]]
