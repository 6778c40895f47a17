"""How well an encoder's attention discovers and tracks objects: DoRA's teacher-side tracker (raysl.methods.dora_track)
run with a registered ViT on clips of a video whose true object masks are known (raysl.data.synthetic_video), scored
by mean IoU (each prototype matched to one object for the whole clip), next to a random init of the same network.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from raysl.data.views import normalize
from raysl.methods.dora_track import discover, last_block_parts, mask_iou, pixel_masks, random_heads, track


@dataclass(frozen=True)
class Clips:
    """Clips of a video and their true masks: frames (C, T, H, W, 3) uint8, masks (C, T, m, H, W) bool."""

    frames: np.ndarray
    masks: np.ndarray


def clips_of(frames: np.ndarray, masks: np.ndarray, frames_per_clip: int, stride: int, every: int) -> Clips:
    """Every clip of `frames_per_clip` frames `stride` apart, starting each `every` frames."""
    span = (frames_per_clip - 1) * stride
    starts = range(0, len(frames) - span, every)
    idx = np.array([[s + j * stride for j in range(frames_per_clip)] for s in starts])
    if not len(idx):
        raise ValueError(f"{len(frames)} frames hold no clip of {frames_per_clip} frames {stride} apart")
    return Clips(frames[idx], masks[idx])


@torch.no_grad()
def clip_iou(vit: nn.Module, clips: Clips, *, image_size: int, mean: tuple[float, ...], std: tuple[float, ...],
             objects: int = 3, draws: int = 3, iters: int = 30, eps: float = 0.05, seed: int = 0) -> float:
    """Mean IoU of the tracked masks against the true ones, over clips and `draws` random choices of heads.
    Frames and true masks are resized to `image_size` squared (the encoder's input), masks at pixel resolution."""
    vit.eval()
    heads_total = int(vit.blocks[-1].attn.num_heads)  # type: ignore[index,union-attr]
    grid: tuple[int, int] = tuple(vit.patch_embed.grid_size)  # type: ignore[union-attr,arg-type,assignment]
    gen = torch.Generator().manual_seed(seed)
    scores: list[float] = []
    for frames, truth in zip(clips.frames, clips.masks, strict=True):
        x = torch.from_numpy(frames).permute(0, 3, 1, 2)  # (T, 3, H, W)
        x = F.interpolate(x.float(), size=(image_size, image_size), mode="bilinear", antialias=True)
        x = normalize(x.round().clamp(0, 255), mean, std)
        gt = F.interpolate(torch.from_numpy(truth).float(), size=(image_size, image_size), mode="nearest") > 0.5
        parts = last_block_parts(vit, x)
        anchor = parts.first_frames(1)
        for _ in range(draws):
            heads = random_heads(heads_total, min(objects, heads_total), gen)
            masks = track(discover(anchor, heads, iters, eps), parts.keys[None])  # (1, T, k, N)
            pred = pixel_masks(masks, grid, image_size)[0, :, :, 0] > 0.5  # (T, k, S, S)
            scores.append(mask_iou(pred, gt))
    return float(np.mean(scores))
