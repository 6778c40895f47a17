"""timm backbones with the classifier removed (num_classes=0), plus a CIFAR-style stem option."""

from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn


def create_backbone(name: str, *, cifar_stem: bool = False, image_size: int | None = None,
                    patch_size: int | None = None, **extra: Any) -> nn.Module:
    """Build `name` from timm without pretrained weights; returns a module with `.num_features`.

    cifar_stem swaps a ResNet's 7×7 stride-2 conv + max-pool for a 3×3 stride-1 conv, the usual
    change for 32 px images.
    """
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, **extra}
    if image_size is not None and name.startswith(("vit", "deit", "eva")):
        kwargs["img_size"] = image_size
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    try:
        model = timm.create_model(name, **kwargs)
    except RuntimeError as exc:
        raise ValueError(f"model.backbone: {name!r} is not a timm model ({exc})") from None
    if cifar_stem:
        if not (hasattr(model, "conv1") and hasattr(model, "maxpool")):
            raise ValueError(f"model.cifar_stem: only ResNet-style backbones have a stem to swap, not {name!r}")
        out_ch = int(model.conv1.out_channels)  # type: ignore[union-attr,arg-type]
        model.conv1 = nn.Conv2d(3, out_ch, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model
