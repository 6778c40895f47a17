"""Configs of the self-distillation methods: DINO (arXiv 2104.14294) and DoRA (arXiv 2310.08584).

Schedules the papers give in epochs are given here in steps (the loop counts steps, not epochs); unset, they take
the papers' share of the run: the teacher temperature warms up over the first 10% (30 of 300 epochs) and the
prototypes stay frozen for the first 1% (one of 100 epochs). Sources: docs/DORA-NOTES.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raysl.config_base import Strict


class SelfDistillConfig(Strict):
    """What DINO and DoRA share: the projection head, temperatures, centering, teacher momentum and clipping."""

    out_dim: int = Field(65536, ge=2, description="prototypes K of the head's weight-normalised last layer")
    hidden_dim: int = Field(2048, ge=1)
    bottleneck_dim: int = Field(256, ge=1)
    norm_last_layer: bool = Field(True, description="fix the last layer's weight-norm gain at 1 (unit prototypes)")
    head_bn: bool = Field(False, description="BatchNorm after the head's hidden layers (DINO's use_bn_in_head, "
                          "its ResNet setting): small ViTs on short runs otherwise collapse to uniform")
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: tuple[float, float] = Field((0.04, 0.07), description="teacher temperature, linear from the "
                                              "first to the second over teacher_temp_warmup_steps, then held")
    teacher_temp_warmup_steps: int | None = Field(None, ge=0, description="unset: 10% of train.steps")
    center_momentum: float = Field(0.9, ge=0, lt=1)
    momentum: tuple[float, float] = Field((0.996, 1.0), description="teacher EMA momentum, cosine from the "
                                          "first to the second over the run")
    freeze_last_layer_steps: int | None = Field(None, ge=0, description="the prototypes get no update for this "
                                                "many steps; unset: 1% of train.steps")
    clip_grad: float | None = Field(3.0, gt=0, description="each parameter's gradient is clipped to this L2 norm "
                                    "on its own (DINO's per-tensor clipping); unset: none")
    local_crops: int = Field(8, ge=0, description="local crops per image (DoRA: per frame)")
    local_size: int | None = Field(None, ge=8, description="local crop side; unset: 96/224 of model.image_size "
                                   "(DINO) or 112/224 (DoRA), rounded to the patch size")
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    flip_p: float = Field(0.5, ge=0, le=1)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = Field(0.8, ge=0, le=1)
    gray_p: float = Field(0.2, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> SelfDistillConfig:
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name}: need 0 < low <= high <= 1, got ({lo}, {hi})")
        return self


class DINOConfig(SelfDistillConfig):
    """DINO: two global crops and `local_crops` local crops of each image (or video frame)."""

    name: Literal["dino"] = "dino"
    blur_p: tuple[float, float, float] = Field((1.0, 0.1, 0.5), description="global 1, global 2, local")
    solarize_p: tuple[float, float, float] = Field((0.0, 0.2, 0.0), description="global 1, global 2, local")


class DoRAConfig(SelfDistillConfig):
    """DoRA: DINO on clips, the student seeing each frame masked to one tracked object at a time."""

    name: Literal["dora"] = "dora"
    teacher_temp: tuple[float, float] = (0.04, 0.04)  # the DoRA README's run: no warm-up
    norm_last_layer: bool = False  # the DoRA README's run (ViT-S)
    local_crops: int = 6
    objects: int = Field(3, ge=1, description="k: objects discovered per clip, one per randomly chosen head")
    sinkhorn_iters: int = Field(30, ge=1)
    sinkhorn_eps: float = Field(0.05, gt=0)
    blur_p: tuple[float, float] = Field((0.1, 0.5), description="global, local")
