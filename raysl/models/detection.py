"""torchvision detectors (Faster R-CNN, RetinaNet, FCOS) built around a raysl encoder.

The detector's backbone holds the encoder module itself (`detector.backbone.body is encoder`), so training the
detector fine-tunes the encoder in place and the caller can export it afterwards.

- CNN encoders (timm ResNets): the last 4 stages via timm's `forward_intermediates`, then torchvision's
  FeaturePyramidNetwork (Lin et al., 2017, https://arxiv.org/abs/1612.03144).
- ViT encoders: ViTDet's simple feature pyramid from the last block's patch-token map (Li et al., 2022,
  https://arxiv.org/abs/2203.16527, §3): maps at 4×, 2×, 1×, ½× its resolution, each projected by 1×1 and
  3×3 convolutions with LayerNorm; no top-down path.

Strides are measured by running the encoder (raysl's CIFAR stem changes them), and anchors are scaled to the
strides and the image size, so that small objects on small images get anchors of their size.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import Conv2dNormActivation

from raysl.models.backbones import eval_mode

Arch = Literal["fasterrcnn", "retinanet", "fcos"]
ARCHS: tuple[Arch, ...] = ("fasterrcnn", "retinanet", "fcos")
NUM_STAGES = 4  # pyramid levels taken from the encoder (before the arch's extra levels)
PROBE_SIZE = 64  # side of the dummy image that measures a CNN's strides: exact up to stride 64 (a 1×1 map)


def is_vit(encoder: nn.Module) -> bool:
    return hasattr(encoder, "patch_embed") and hasattr(encoder, "blocks")


def _extra_block(arch: Arch, channels: int) -> tuple[ExtraFPNBlock, int]:
    """The arch's extra top level(s) and how many: a max-pool level for the RPN (FPN paper), or P6/P7 from P5
    (RetinaNet; FCOS computes P6 from P5 as here)."""
    if arch == "fasterrcnn":
        return LastLevelMaxPool(), 1
    return LastLevelP6P7(channels, channels), 2


class CNNBackbone(nn.Module):
    """The last NUM_STAGES stages of a timm CNN → FPN (+ the extra levels); `out_channels` as torchvision wants."""

    def __init__(self, encoder: nn.Module, in_channels: list[int], out_channels: int, extra: ExtraFPNBlock) -> None:
        super().__init__()
        self.body = encoder
        self.n_levels = len(in_channels)  # timm: an int index means "the last n feature levels"
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body.forward_intermediates(x, indices=self.n_levels, intermediates_only=True)  # type: ignore[operator]
        out: OrderedDict[str, torch.Tensor] = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))
        return out


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid over a timm ViT's last-block patch map (prefix tokens excluded)."""

    scales = (4.0, 2.0, 1.0, 0.5)

    def __init__(self, encoder: nn.Module, out_channels: int, extra: ExtraFPNBlock) -> None:
        super().__init__()
        self.body = encoder
        dim = int(encoder.num_features)  # type: ignore[arg-type]
        self.patch = int(encoder.patch_embed.patch_size[0])  # type: ignore[union-attr,index]
        self.stages = nn.ModuleList()
        for scale in self.scales:
            if scale == 4.0:  # two stride-2 deconvolutions with LN + GELU between, as in ViTDet
                up: nn.Module = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2),
                                              nn.GELU(), nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2))
                ch = dim // 4
            elif scale == 2.0:
                up, ch = nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), dim // 2
            elif scale == 1.0:
                up, ch = nn.Identity(), dim
            else:  # ceil_mode keeps the ceil(h/2) size that the anchor generator's stride arithmetic expects
                up, ch = nn.MaxPool2d(2, stride=2, ceil_mode=True), dim
            self.stages.append(nn.Sequential(
                up,
                Conv2dNormActivation(ch, out_channels, 1, norm_layer=LayerNorm2d, activation_layer=None),
                Conv2dNormActivation(out_channels, out_channels, 3, norm_layer=LayerNorm2d, activation_layer=None),
            ))
        self.extra = extra
        self.out_channels = out_channels

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's patch tokens as a (B, D, ceil(H/p), ceil(W/p)) map, final norm applied (the features the
        encoder was pretrained and evaluated with). A ViT with a fixed input size gets the batch zero-padded to it
        (bottom/right, as the detector's own batching pads) and the map cropped back."""
        h, w = x.shape[-2:]
        pe = self.body.patch_embed
        if getattr(pe, "strict_img_size", False) and not getattr(self.body, "dynamic_img_size", False):
            full_h, full_w = pe.img_size  # type: ignore[union-attr,misc]
            if h > full_h or w > full_w:
                raise ValueError(f"images of {h}×{w} exceed the ViT's input size {full_h}×{full_w}")
            x = F.pad(x, (0, full_w - w, 0, full_h - h))
        (fmap,) = self.body.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)  # type: ignore[operator]
        return fmap[..., : math.ceil(h / self.patch), : math.ceil(w / self.patch)]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        fmap = self.tokens(x)
        feats = [stage(fmap) for stage in self.stages]
        names = [str(i) for i in range(len(feats))]
        feats, names = self.extra(feats, feats, names)
        return OrderedDict(zip(names, feats, strict=True))


def _probe(fn: Callable[[torch.Tensor], Any], module: nn.Module, side: int) -> Any:
    """Run `fn` on a zero image in eval mode (BatchNorm statistics untouched), restoring the training flag."""
    param = next(module.parameters())
    with eval_mode(module), torch.no_grad():
        return fn(torch.zeros(1, 3, side, side, device=param.device, dtype=param.dtype))


def _build_backbone(encoder: nn.Module, arch: Arch, fpn_channels: int) -> tuple[nn.Module, list[int]]:
    """The backbone around `encoder` and the strides of its pyramid levels (encoder levels, then extra ones)."""
    extra, n_extra = _extra_block(arch, fpn_channels)
    if is_vit(encoder):
        pyramid = SimpleFeaturePyramid(encoder, fpn_channels, extra)
        backbone: nn.Module = pyramid
        patch = pyramid.patch
        if patch & (patch - 1):  # RoIAlign and the anchor generator infer strides as powers of two
            raise ValueError(f"detection needs a power-of-two patch size, not {patch}")
        strides = [int(patch / s) for s in SimpleFeaturePyramid.scales if patch / s >= 1]
        if len(strides) < NUM_STAGES:
            raise ValueError(f"patch size {patch} is too small for the 4× level of the simple feature pyramid")
    else:
        if not hasattr(encoder, "forward_intermediates"):
            raise ValueError(f"{type(encoder).__name__} has no forward_intermediates (timm ≥ 1.0 CNNs and ViTs do)")
        intermediates: Callable[..., list[torch.Tensor]] = encoder.forward_intermediates  # type: ignore[assignment]
        feats = _probe(lambda x: intermediates(x, indices=NUM_STAGES, intermediates_only=True), encoder, PROBE_SIZE)
        # measured, not read from feature_info: raysl's CIFAR stem removes two stride-2 steps timm still lists
        strides = [2 ** round(math.log2(PROBE_SIZE / f.shape[-1])) for f in feats]
        backbone = CNNBackbone(encoder, [int(f.shape[1]) for f in feats], fpn_channels, extra)
    strides += [strides[-1] * 2 ** (k + 1) for k in range(n_extra)]
    return backbone, strides


def anchor_generator(arch: Arch, strides: Sequence[int], image_size: int) -> AnchorGenerator:
    """Anchors per level, doubling with the stride: size = c·stride, c = image_size / coarsest stride clipped to
    [2, 8], so the coarsest anchor is about the image and each finer level halves it (c = 8 is torchvision's 800-px
    Faster R-CNN: 32 px at stride 4; c ≥ 2 keeps an anchor at least two cells wide). RetinaNet adds its octave scales
    2^(0, 1/3, 2/3); both use aspect ratios 0.5/1/2. FCOS's "anchor" is the location itself: size = stride, which its
    loss multiplies by 4 and 8 to give each level its range of box sizes."""
    n = len(strides)
    if arch == "fcos":
        return AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * n)
    c = min(max(image_size / strides[-1], 2.0), 8.0)
    octaves = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)) if arch == "retinanet" else (1.0,)
    sizes = tuple(tuple(round(c * s * o, 2) for o in octaves) for s in strides)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * n)


def _one_based(forward: Callable[..., Any], training: bool, images: list[torch.Tensor],
               targets: list[dict[str, torch.Tensor]] | None) -> Any:
    if targets is not None:
        targets = [{**t, "labels": t["labels"] - 1} for t in targets]
    out = forward(images, targets)
    if not training:
        for det in out:
            det["labels"] = det["labels"] + 1
    return out


# torchvision's sigmoid-headed detectors have C logits for classes 0..C-1 and index them with the targets' labels,
# so raysl's 1..C labels are shifted on the way in and out (torchvision's COCO weights keep a dead logit 0 instead).
class OneBasedRetinaNet(RetinaNet):
    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        return _one_based(super().forward, self.training, images, targets)


class OneBasedFCOS(FCOS):
    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        return _one_based(super().forward, self.training, images, targets)


def build_detector(encoder: nn.Module, *, arch: Arch, num_classes: int, image_size: int, mean: Sequence[float],
                   std: Sequence[float], fpn_channels: int = 128, detections_per_img: int = 100) -> nn.Module:
    """A torchvision detector whose backbone wraps `encoder` (shared parameters). `num_classes` counts foreground
    classes; targets and outputs use labels 1..num_classes; images are float in [0, 1], any size (resized so the
    longer side is `image_size`, then normalized with mean/std)."""
    if arch not in ARCHS:
        raise ValueError(f"detection arch must be one of {ARCHS}, not {arch!r}")
    if arch == "fcos" and fpn_channels % 32:
        raise ValueError(f"FCOS's head uses GroupNorm(32): fpn_channels must be a multiple of 32, not {fpn_channels}")
    backbone, strides = _build_backbone(encoder, arch, fpn_channels)
    anchors = anchor_generator(arch, strides, image_size)
    common: dict[str, Any] = {
        "min_size": image_size, "max_size": image_size, "image_mean": list(mean), "image_std": list(std),
        # a ViT's fixed input must not be exceeded by the batch padding: pad to the patch grid only
        "size_divisible": backbone.patch if isinstance(backbone, SimpleFeaturePyramid) else 32,
    }
    if arch == "fasterrcnn":
        # torchvision's sampling sizes are for ~800 px images with many objects; scale them with the image area
        # (floors keep enough proposals for detections_per_img and enough RoIs to learn from)
        area = min(1.0, (image_size / 800) ** 2)
        train_props, test_props = max(300, round(2000 * area)), max(150, detections_per_img, round(1000 * area))
        return FasterRCNN(
            backbone, num_classes=num_classes + 1, rpn_anchor_generator=anchors,  # +1: softmax background class 0
            box_roi_pool=MultiScaleRoIAlign([str(i) for i in range(NUM_STAGES)], output_size=7, sampling_ratio=2),
            rpn_pre_nms_top_n_train=train_props, rpn_post_nms_top_n_train=train_props,
            rpn_pre_nms_top_n_test=test_props, rpn_post_nms_top_n_test=test_props,
            rpn_batch_size_per_image=max(64, round(256 * area)), box_batch_size_per_image=max(64, round(512 * area)),
            box_detections_per_img=detections_per_img, **common)
    cls = OneBasedRetinaNet if arch == "retinanet" else OneBasedFCOS
    # score_thresh 0.05 for both (the RetinaNet and FCOS papers' inference threshold; torchvision's FCOS uses 0.2)
    detector: nn.Module = cls(backbone, num_classes=num_classes, anchor_generator=anchors, score_thresh=0.05,
                              detections_per_img=detections_per_img, **common)
    return detector


def feature_shapes(detector: nn.Module, image_size: int) -> dict[str, tuple[int, int]]:
    """The pyramid's map sizes (h, w) for one image_size × image_size image, by level name."""
    backbone: nn.Module = detector.backbone  # type: ignore[assignment]
    feats = _probe(backbone, backbone, image_size)
    return {name: (int(f.shape[-2]), int(f.shape[-1])) for name, f in feats.items()}
