"""Batched view augmentations: random resized crops, flips, colour jitter, grayscale, blur and solarize applied
to a whole batch of images as tensors, with one set of random parameters per image.

The same code runs on a Ray Data CPU worker (`data.augment_on: cpu`, after the per-image decode and crop) and
on the training worker's device (`data.augment_on: gpu`, after the batch is moved there). Per image it draws
what torchvision's per-image pipeline draws (RandomResizedCrop's ten tries and fallback; ColorJitter's four
factors in a random order; the probabilities of each step), so the views come from the same distribution as
the PIL pipeline they replace, at a fraction of the per-image cost (tests/unit/test_augment.py compares them).
Random parameters are drawn with numpy on the host (a few numbers per image) and applied on the batch's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
SOLARIZE_THRESHOLD = 128 / 255
BLUR_SIGMA = (0.1, 2.0)
CHUNK_FLOATS = 1 << 18


@dataclass(frozen=True)
class ViewSpec:
    """One view's augmentations, in the order they apply (BYOL, paper's Table 6; I-JEPA and CLIP use the first
    two). `jitter` = (brightness, contrast, saturation, hue) as in torchvision's ColorJitter."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.0
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    jitter_p: float = 0.0
    gray_p: float = 0.0
    blur_p: float = 0.0
    solarize_p: float = 0.0

    @property
    def blur_kernel(self) -> int:
        return max(3, int(0.1 * self.size) // 2 * 2 + 1)  # ~10% of the image side, odd

    @property
    def needs_colour(self) -> bool:
        jitter = self.jitter_p > 0 and any(j > 0 for j in self.jitter)
        return jitter or self.gray_p > 0 or self.blur_p > 0 or self.solarize_p > 0


def sample_crops(width: np.ndarray, height: np.ndarray, scale: tuple[float, float], ratio: tuple[float, float],
                 rng: np.random.Generator, tries: int = 10) -> np.ndarray:
    """RandomResizedCrop's boxes for images of the given sizes: (N, 4) int64 rows (x0, y0, w, h).

    torchvision's algorithm, vectorised: up to `tries` draws of area fraction and log-uniform aspect per image,
    the first that fits; none fits → the largest centred crop within `ratio`."""
    w_img, h_img = np.asarray(width, dtype=np.int64), np.asarray(height, dtype=np.int64)
    n = len(w_img)
    area = (w_img * h_img)[:, None] * rng.uniform(scale[0], scale[1], (n, tries))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, tries)))
    w = np.rint(np.sqrt(area * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    fits = (w > 0) & (h > 0) & (w <= w_img[:, None]) & (h <= h_img[:, None])
    first = fits.argmax(axis=1)
    rows = np.arange(n)
    cw, ch = w[rows, first], h[rows, first]
    u = rng.random((n, 2))
    y0 = np.floor(u[:, 0] * (h_img - ch + 1)).astype(np.int64)
    x0 = np.floor(u[:, 1] * (w_img - cw + 1)).astype(np.int64)
    none = ~fits.any(axis=1)
    if none.any():  # fallback, as torchvision: the whole image, trimmed to the nearest allowed aspect
        in_ratio = w_img / np.maximum(h_img, 1)
        fw = np.where(in_ratio > ratio[1], np.rint(h_img * ratio[1]), w_img).astype(np.int64)
        fh = np.where(in_ratio < ratio[0], np.rint(w_img / ratio[0]), h_img).astype(np.int64)
        cw, ch = np.where(none, fw, cw), np.where(none, fh, ch)
        x0 = np.where(none, (w_img - cw) // 2, x0)
        y0 = np.where(none, (h_img - ch) // 2, y0)
    return np.stack([x0, y0, cw, ch], axis=1)


def _per_image(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1 - factor) * other).clamp_(0, 1)


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f).clamp_(0, 1)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x), f)


def _hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue (hue rotated by `f` turns in HSV, saturation and value kept), computed directly:
    each channel is v − c·clamp(min(k, 4 − k), 0, 1) with k = (n + 6h) mod 6 (n = 5, 3, 1), the closed form of
    HSV → RGB. torchvision's round trip through an HSV tensor took 3.4 ms per 224-px image on one CPU thread, this
    1.05 ms (max(dim) with indices, `where` and `remainder` are the slow ops on CPU); it agrees to 2e-6
    (tests/unit/test_augment.py)."""
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    c = maxc - minc
    r, g, b = x.unbind(dim=1)
    # the sector's numerator, picked as torchvision picks it: red if it is the max, else green, else blue
    num = torch.where(maxc == r, g - b, torch.where(maxc == g, (b - r).add_(c, alpha=2), (r - g).add_(c, alpha=4)))
    turns = num.div_(torch.where(c > 0, c, 1.0).mul_(6)).add_(f.view(-1, 1, 1))  # hue + f, in turns
    out = torch.empty_like(x)
    for i, n in enumerate((5 / 6, 3 / 6, 1 / 6)):
        k = turns + n
        k = k.sub_(k.floor()).mul_(6)
        torch.sub(maxc, torch.minimum(k, 4 - k).clamp_(0, 1).mul_(c), out=out[:, i])
    return out


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)


def gaussian_blur(x: torch.Tensor, kernel: int, sigma: torch.Tensor) -> torch.Tensor:
    """Each image blurred with its own sigma: a separable Gaussian as a grouped convolution, reflect padding
    (torchvision's kernel and padding)."""
    n, c, h, w = x.shape
    half = (kernel - 1) / 2
    t = torch.linspace(-half, half, kernel, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None, :] / sigma.view(-1, 1)) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, kernel)
    y = F.pad(x.reshape(1, n * c, h, w), (kernel // 2,) * 4, mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, kernel, 1), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, 1, kernel), groups=n * c)
    return y.view(n, c, h, w)


def _on_rows(x: torch.Tensor, sel: np.ndarray, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`fn` applied to the images `sel` of `x`. When it picks every image (always so for a chunk of one, as at
    224 px), `fn` runs on `x` itself, without gather and scatter copies (the two-view 224-px transform: 13.9 →
    13.1 ms per image)."""
    if len(sel) == 0:
        return x
    if len(sel) == len(x):
        return fn(x)
    idx = torch.as_tensor(sel, device=x.device)
    x[idx] = fn(x[idx])
    return x


def _jitter_op(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], factors: np.ndarray,
               x: torch.Tensor) -> torch.Tensor:
    return fn(x, _per_image(factors, x))


def _jitter(x: torch.Tensor, spec: ViewSpec, rng: np.random.Generator) -> torch.Tensor:
    n = len(x)
    apply = rng.random(n) < spec.jitter_p
    bounds = [(max(0.0, 1 - j), 1 + j) for j in spec.jitter[:3]] + [(-spec.jitter[3], spec.jitter[3])]
    factors = np.stack([rng.uniform(lo, hi, n) for lo, hi in bounds], axis=1)
    order = np.argsort(rng.random((n, 4)), axis=1)  # each image's own order of the four, as ColorJitter
    for stage in range(4):
        for op, fn in enumerate(_JITTER_OPS):
            if spec.jitter[op] <= 0:
                continue
            sel = np.flatnonzero(apply & (order[:, stage] == op))
            x = _on_rows(x, sel, partial(_jitter_op, fn, factors[sel, op]))
    return x


def chunk_rows(x: torch.Tensor) -> int:
    """Images per chunk on the CPU: about 1 MB of float pixels, so each elementwise pass runs in cache (measured
    on a 224-px batch of 64: contrast 6×, hue 2.4× faster per image in chunks of 4 than over the whole batch)."""
    if x.device.type != "cpu":
        return len(x)
    return max(1, CHUNK_FLOATS // max(1, x[0].numel()))


def augment(x: torch.Tensor, spec: ViewSpec, rng: np.random.Generator) -> torch.Tensor:
    """Flip, colour jitter, grayscale, blur, solarize — each image its own draw — on float (N, 3, H, W) in [0, 1]
    (modified in place and returned)."""
    step = chunk_rows(x)
    if step < len(x):
        for i in range(0, len(x), step):
            x[i:i + step] = augment(x[i:i + step], spec, rng)
        return x
    n = len(x)
    if spec.flip_p > 0:
        x = _on_rows(x, np.flatnonzero(rng.random(n) < spec.flip_p), lambda v: v.flip(-1))
    if spec.jitter_p > 0 and any(j > 0 for j in spec.jitter):
        x = _jitter(x, spec, rng)
    if spec.gray_p > 0:
        x = _on_rows(x, np.flatnonzero(rng.random(n) < spec.gray_p),
                     lambda v: _gray(v).expand(-1, 3, -1, -1).contiguous())
    if spec.blur_p > 0:
        picked = np.flatnonzero(rng.random(n) < spec.blur_p)
        sigma = torch.as_tensor(rng.uniform(*BLUR_SIGMA, n)[picked], dtype=x.dtype, device=x.device)
        x = _on_rows(x, picked, lambda v: gaussian_blur(v, spec.blur_kernel, sigma))
    if spec.solarize_p > 0:
        x = _on_rows(x, np.flatnonzero(rng.random(n) < spec.solarize_p),
                     lambda v: torch.where(v >= SOLARIZE_THRESHOLD, 1 - v, v))
    return x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def augment_uint8(images: torch.Tensor, spec: ViewSpec, rng: np.random.Generator) -> torch.Tensor:
    """`augment` on uint8 (N, 3, H, W); a view with only a flip stays in uint8."""
    if not spec.needs_colour:
        if spec.flip_p > 0:
            sel = torch.as_tensor(np.flatnonzero(rng.random(len(images)) < spec.flip_p), device=images.device)
            images[sel] = images[sel].flip(-1)
        return images
    step = chunk_rows(images)
    for i in range(0, len(images), step):  # in chunks, so the float copy of the batch is never made whole
        images[i:i + step] = to_uint8(augment(images[i:i + step].float().div_(255), spec, rng))
    return images


class DeviceViews:
    """`data.augment_on: gpu`: the views made on the training worker's device from `decoded` (uint8 (N, 3, D, D),
    each image resized whole to D×D on the CPU) and `decoded_hw` (N, 2: the decoded width, height), which the
    crops are drawn in, so crop areas and aspects are those of the original image. Crops are cut and resized by
    roi_align with adaptive sampling (an average over each output pixel's footprint, i.e. antialiased)."""

    def __init__(self, specs: dict[str, ViewSpec], seed: int | None = None) -> None:
        self.specs = specs
        self.rng = np.random.default_rng(seed)

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {k: v for k, v in batch.items() if k not in ("decoded", "decoded_hw")}
        decoded, hw = batch["decoded"], batch["decoded_hw"].cpu().numpy()
        side = decoded.shape[-1]
        x = decoded.float().div_(255)
        rows = torch.arange(len(x), device=x.device, dtype=x.dtype).view(-1, 1)
        for name, spec in self.specs.items():
            x0, y0, w, h = sample_crops(hw[:, 0], hw[:, 1], spec.scale, spec.ratio, self.rng).T
            sx, sy = side / np.maximum(hw[:, 0], 1), side / np.maximum(hw[:, 1], 1)
            boxes = np.stack([x0 * sx, y0 * sy, (x0 + w) * sx, (y0 + h) * sy], axis=1)
            rois = torch.cat([rows, torch.as_tensor(boxes, dtype=x.dtype, device=x.device)], dim=1)
            view = roi_align(x, rois, output_size=spec.size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
            out[name] = to_uint8(augment(view.clamp_(0, 1), spec, self.rng))
        return out
