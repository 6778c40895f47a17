"""timm backbones with the classifier removed (num_classes=0), plus a CIFAR-style stem option."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import timm
import torch.nn as nn

from raysl.models.spec import check_backbone_kwargs, check_backbone_name


def timm_args(name: str, image_size: int | None, patch_size: int | None, extra: dict[str, Any]) -> dict[str, Any]:
    """The `timm.create_model` arguments (beside the name) that build a raysl encoder: no classifier, the
    configured image and patch size for ViTs, and any extra arguments."""
    args: dict[str, Any] = {"num_classes": 0, **extra}
    if image_size is not None and name.startswith(("vit", "deit", "eva")):
        args["img_size"] = image_size
    if patch_size is not None:
        args["patch_size"] = patch_size
    return args


def timm_config(spec: dict[str, Any]) -> dict[str, Any]:
    """A small config beside the exported weights so plain timm rebuilds and loads the encoder:
    `timm.create_model(c["architecture"], pretrained=True, pretrained_cfg_overlay={"file": weights,
    **c["pretrained_cfg"]}, **c["model_args"])`. A CIFAR-stem ResNet has a stem timm cannot build by
    arguments: `cifar_stem` says so, and the README gives the two lines that swap it before loading."""
    s = spec["image_size"]
    return {
        "architecture": spec["backbone"],
        "model_args": timm_args(spec["backbone"], s, spec.get("patch_size"), dict(spec.get("backbone_kwargs", {}))),
        "pretrained_cfg": {"num_classes": 0, "input_size": [3, s, s], "mean": list(spec["mean"]),
                           "std": list(spec["std"])},
        "cifar_stem": bool(spec.get("cifar_stem")),
    }


def create_backbone(name: str, *, cifar_stem: bool = False, image_size: int | None = None,
                    patch_size: int | None = None, **extra: Any) -> nn.Module:
    """Build `name` from timm without pretrained weights; returns a module with `.num_features`. The name and the
    extra arguments must pass `raysl.models.spec` (a ValueError names the field otherwise).

    cifar_stem swaps a ResNet's 7×7 stride-2 conv + max-pool for a 3×3 stride-1 conv, the usual
    change for 32 px images.
    """
    # The same allow-list as a registered spec: a config cannot train what downstream jobs would refuse to load,
    # and no name or argument makes timm download or unpickle anything.
    check_backbone_name(name, "model.backbone")
    check_backbone_kwargs(extra, "model.backbone_kwargs")
    kwargs = timm_args(name, image_size, patch_size, extra)
    try:
        model = timm.create_model(name, **kwargs, pretrained=False)  # last, so nothing can turn it on
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"model.backbone: {name!r} cannot be built with {sorted(extra)} ({exc})") from None
    if cifar_stem:
        conv1 = getattr(model, "conv1", None)
        if not (isinstance(conv1, nn.Conv2d) and hasattr(model, "maxpool")):
            raise ValueError(f"model.cifar_stem: only ResNet-style backbones with a one-conv stem have a stem to "
                             f"swap, not {name!r}")
        out_ch = int(conv1.out_channels)
        model.conv1 = nn.Conv2d(3, out_ch, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode for the block (BatchNorm uses and keeps its running statistics), then back to the
    mode it was in."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)
