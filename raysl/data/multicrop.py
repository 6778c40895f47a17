"""DINO's multi-crop views (Caron et al., arXiv 2104.14294, Sec. 3.1; the official `DataAugmentationDINO`): two
global crops at the model's image size and N local crops at a smaller size, each with its own augmentations.

Every crop: RandomResizedCrop (bicubic, as the reference code), flip, colour jitter, grayscale; then blur with
its own probability (global 1: always, global 2: 0.1, locals: 0.5) and solarize on global 2 only (0.2). The
crops leave as uint8 CHW columns `global0`, `global1`, `local0` … `local{N-1}`; works on images and on clips of
decoded video frames (one sample per frame; see raysl.data.frames).
"""

from __future__ import annotations

from typing import Protocol

from PIL import Image

from raysl.data.augment import ViewSpec
from raysl.data.views import CropViews

GLOBAL_CROPS = 2


def crop_columns(local_crops: int) -> tuple[str, ...]:
    """The view columns, global crops first (the teacher's, in the order the loss pairs them)."""
    return (*(f"global{i}" for i in range(GLOBAL_CROPS)), *(f"local{i}" for i in range(local_crops)))


class CropSettings(Protocol):
    """What the crops need from a method's config (raysl.config_ssl.DINOConfig has it)."""

    @property
    def local_crops(self) -> int: ...
    @property
    def global_scale(self) -> tuple[float, float]: ...
    @property
    def local_scale(self) -> tuple[float, float]: ...
    @property
    def flip_p(self) -> float: ...
    @property
    def jitter(self) -> tuple[float, float, float, float]: ...
    @property
    def jitter_p(self) -> float: ...
    @property
    def gray_p(self) -> float: ...
    @property
    def blur_p(self) -> tuple[float, float, float]: ...  # global 1, global 2, local
    @property
    def solarize_p(self) -> tuple[float, float, float]: ...  # global 1, global 2, local


def multi_crop_specs(image_size: int, local_size: int, c: CropSettings) -> dict[str, ViewSpec]:
    """One ViewSpec per crop, global crops first."""

    def spec(size: int, scale: tuple[float, float], kind: int) -> ViewSpec:
        return ViewSpec(size, scale, flip_p=c.flip_p, jitter=c.jitter, jitter_p=c.jitter_p, gray_p=c.gray_p,
                        blur_p=c.blur_p[kind], solarize_p=c.solarize_p[kind])

    specs = {f"global{i}": spec(image_size, c.global_scale, i) for i in range(GLOBAL_CROPS)}
    specs.update({f"local{i}": spec(local_size, c.local_scale, 2) for i in range(c.local_crops)})
    return specs


def MultiCrop(image_size: int, local_size: int, max_pixels: int, settings: CropSettings) -> CropViews:
    """The CPU transform of DINO's crops. JPEGs are drafted only as far as the most demanding crop allows (a 96-px
    local crop of 5% of the image needs more source pixels than a 224-px global crop of 40%)."""
    return CropViews(max_pixels, multi_crop_specs(image_size, local_size, settings), resample=Image.Resampling.BICUBIC)
