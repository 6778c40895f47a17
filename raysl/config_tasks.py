"""Configs of the downstream tasks that run on the pretraining loop: classification fine-tuning and object
detection, each starting from a registered encoder (`init: pretrained`) or from scratch (`init: random`).

`raysl finetune` fills the run-only fields (`init_weights`, `subset_uri`) itself; they point at files it
writes under the run storage, and are left out of the exported model config.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from raysl.config_base import Strict


class DownstreamConfig(Strict):
    classes: list[str] = Field(description="class names in label order (filled by `raysl finetune`)")
    init: Literal["pretrained", "random"] = "pretrained"
    init_weights: str | None = Field(None, description="run-only: URI of the encoder's safetensors weights")
    freeze_steps: int = Field(0, ge=0, description="the first steps train only the head, the encoder frozen "
                                                  "(eval mode, no gradient): a linear warm-up before fine-tuning")
    layer_decay: float | None = Field(None, gt=0, le=1, description="layer-wise LR decay (timm's layer groups): "
                                      "the LR of an encoder layer is lr × layer_decay^(layers above it)")
    flip_p: float = Field(0.5, ge=0, le=1)

    @field_validator("classes")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"class names repeat: {sorted({c for c in v if v.count(c) > 1})}")
        return v


class ClassifyConfig(DownstreamConfig):
    """Full fine-tuning of the encoder plus a linear head, with supervised augmentation."""

    name: Literal["classify"] = "classify"
    subset_uri: str | None = Field(None, description="run-only: JSON list of the sample keys to train on "
                                                    "(the seeded, stratified label fraction)")
    label_fraction: float = Field(1.0, gt=0, le=1, description="recorded; the subset itself is subset_uri")
    crop_scale: tuple[float, float] = (0.35, 1.0)
    auto_augment: Literal["none", "trivial", "randaugment"] = "none"
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    head_dropout: float = Field(0.0, ge=0, lt=1)
    head_norm: bool = Field(True, description="standardize features (BatchNorm without affine) before the head")

    @field_validator("classes")
    @classmethod
    def _two(cls, v: list[str]) -> list[str]:
        if len(v) < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {v}")
        return v


class DetectConfig(DownstreamConfig):
    """A torchvision detector over the encoder: an FPN over CNN stages, or ViTDet's simple pyramid for ViTs."""

    name: Literal["detect"] = "detect"
    arch: Literal["fasterrcnn", "retinanet", "fcos"] = "fasterrcnn"
    fpn_channels: int = Field(128, gt=0)
    max_boxes: int = Field(50, gt=0, description="boxes kept per image (the rest are counted as dropped)")
    annotations: str = Field("annotations.json", description="the COCO file inside data.uri")
    detections_per_img: int = Field(100, gt=0)
