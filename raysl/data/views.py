"""Per-method batch transforms run on Ray Data CPU workers: decode, crop, augment → fixed-size arrays.

Every transform emits a `valid` column: rows whose bytes do not decode to an image are kept as zeros
with valid=False, so the training worker counts them exactly and stops past `max_bad_fraction`.
Images leave here as uint8 CHW; the training worker scales and normalizes them (4× less to move).

A task decodes and transforms one image at a time, so its memory is the batch's output arrays plus one decoded
image (256 decoded 24-MP photos alone are 18 GB). Large JPEGs are decoded at a reduced scale (libjpeg's
DCT scaling, PIL's `draft`) when the output needs far fewer pixels: never below what the output size needs.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile
from torchvision.transforms import v2 as T

from raysl.data.augment import ViewSpec, augment_uint8, sample_crops
from raysl.data.frames import FrameRows

log = logging.getLogger(__name__)

ImageFile.LOAD_TRUNCATED_IMAGES = False

# RandomResizedCrop's aspect ratios run from 3/4 to 4/3 (torchvision's default, used by every view here).
_MIN_CROP_RATIO = 3 / 4


class BadImage(ValueError):
    pass


def crop_draft_side(size: int, min_scale: float) -> int:
    """The smallest short side at which every RandomResizedCrop to `size` (area ≥ `min_scale` of the image,
    aspect 3/4…4/3) still spans ≥ `size` source pixels each way, so no crop is upsampled because of `draft`.

    A crop of area a = s·W·H and aspect r has sides √(a·r) and √(a/r) ≥ √(a·3/4); W·H ≥ m² for the short side
    m, so m ≥ size / √(s_min·3/4) suffices (BYOL's 0.08 at 224: 915 px, so a 6000×4000 JPEG decodes at 1/4,
    1500×1000). The "2× the output" rule of thumb would allow 1/8 (750×500) and upsample the smallest crops
    (150 px) 1.5×; I-JEPA's 0.3 needs 473 px and gets 1/8 either way.
    """
    return math.ceil(size / math.sqrt(max(min_scale, 1e-4) * _MIN_CROP_RATIO))


def decode_image(data: bytes, max_pixels: int, draft_side: int | None = None) -> Image.Image:
    """Bytes → RGB PIL image. Grayscale, palette, CMYK and 16-bit images are converted, not dropped.

    `draft_side`: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale, keeping both sides ≥ draft_side (other
    formats decode at full size). `max_pixels` applies to the stored size, drafted or not.
    """
    if not data:
        raise BadImage("zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise BadImage(f"{w}x{h} exceeds max_image_pixels={max_pixels}")
            if draft_side:
                img.draft("RGB", (draft_side, draft_side))  # a no-op unless a JPEG is ≥ 2× draft_side each way
            img.load()
    except BadImage:
        raise
    except Exception as exc:  # PIL raises many types for corrupt and truncated files
        raise BadImage(f"{type(exc).__name__}: {exc}") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        span = float(arr.max() - arr.min()) or 1.0
        img = Image.fromarray(((arr - arr.min()) / span * 255).astype(np.uint8), mode="L")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def decode_or_none(data: bytes, key: str, max_pixels: int, draft_side: int | None = None) -> Image.Image | None:
    """`decode_image`, or None (logged) for bytes that are not an image."""
    try:
        return decode_image(bytes(data), max_pixels, draft_side)
    except BadImage as exc:
        log.warning("skipping bad image %s: %s", key, exc)
        return None


def _to_chw_uint8(img: Image.Image | torch.Tensor) -> np.ndarray:
    if isinstance(img, torch.Tensor):
        return img.numpy()
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def _finish(out: dict[str, np.ndarray], valid: np.ndarray, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A transform's outputs plus `valid`, `key` and the label/caption columns passed through."""
    out["valid"] = valid
    out["key"] = np.asarray(batch["key"])
    for passthrough in ("label", "caption"):
        if passthrough in batch:
            out[passthrough] = np.asarray(batch[passthrough])
    return out


class _Transform:
    """Shared set-up: one torch thread per decode task, so Ray Data tasks do not oversubscribe cores.

    `draft_side`: the short side a subclass needs from its decoder (None: full size).
    """

    draft_side: int | None = None

    def __init__(self, image_size: int, max_pixels: int) -> None:
        self.size = image_size
        self.max_pixels = max_pixels

    def _render(self, batch: dict[str, np.ndarray],
                outputs: dict[str, Callable[[Image.Image], Image.Image | torch.Tensor]]) -> dict[str, np.ndarray]:
        """Decode each image once, apply each named output's pipeline: uint8 (N,3,S,S) per name, zeros where
        invalid. One decoded image is alive at a time."""
        torch.set_num_threads(1)
        n, s = len(batch["key"]), self.size
        out: dict[str, np.ndarray] = {name: np.zeros((n, 3, s, s), dtype=np.uint8) for name in outputs}
        valid = np.zeros(n, dtype=bool)
        # A plain index loop: enumerate/zip over a generator of images would keep the previous image in their
        # reused result tuple while the next one decodes (two alive at the peak).
        for i in range(n):
            im = decode_or_none(batch["image"][i], str(batch["key"][i]), self.max_pixels, self.draft_side)
            if im is None:
                continue
            valid[i] = True
            for name, pipe in outputs.items():
                out[name][i] = _to_chw_uint8(pipe(im))
            del im  # released before the next one is decoded
        return _finish(out, valid, batch)


def _chw(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


class CropViews(_Transform):
    """Random-resized-crop views of each image, augmented as a batch (raysl.data.augment); each view at its own
    spec's size (DINO's global and local crops differ).

    `on="cpu"`: each image is decoded (drafted as far as the smallest crop allows), each view's crop is cut and
    resized in one PIL call (`resample`), then each view's flips, colour jitter, grayscale, blur and solarize run
    on the whole batch as tensors. `on="gpu"`: each image is decoded and resized whole to `decode_side`², with its
    decoded width and height (`decoded`, `decoded_hw`); the training worker makes the views on its device
    (`augment.DeviceViews`, same specs, same distribution).

    A batch of video clips (`frames`, `ok`, `key` instead of `image`; raysl.data.frames) gives one sample per
    frame, keyed `{key}/{t}`: frames are decoded already, so nothing is drafted.
    """

    def __init__(self, max_pixels: int, specs: dict[str, ViewSpec], *, on: str = "cpu",
                 decode_side: int | None = None, resample: Image.Resampling = Image.Resampling.BILINEAR) -> None:
        size = max(s.size for s in specs.values())
        super().__init__(size, max_pixels)
        if on not in ("cpu", "gpu"):
            raise ValueError(f"data.augment_on: {on!r} is not one of ('cpu', 'gpu')")
        self.specs, self.on, self.resample = specs, on, resample
        self.decode_side = decode_side or 2 * size
        # Each view's own bound: the draft keeps every crop of every view at ≥ its output size (one shared
        # bound from the largest size and the smallest scale would decode DINO's images 2-3× larger than needed).
        self.draft_side = (max(crop_draft_side(s.size, s.scale[0]) for s in specs.values()) if on == "cpu"
                           else self.decode_side)
        self.rng = np.random.default_rng()  # unseeded: each task's views differ

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A copy unpickled in a Ray task draws afresh: the pickled generator's state would give every task, and
        # every epoch of one execution (raysl.train.span), the same crops, flips and colours.
        self.__dict__.update(state)
        self.rng = np.random.default_rng()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch.set_num_threads(1)
        frames = FrameRows(batch) if "frames" in batch else None
        columns = frames.columns if frames is not None else batch
        n, gpu = len(columns["key"]), self.on == "gpu"
        out: dict[str, np.ndarray] = ({"decoded": np.zeros((n, 3, self.decode_side, self.decode_side), np.uint8)}
                                      if gpu else {name: np.zeros((n, 3, spec.size, spec.size), dtype=np.uint8)
                                                   for name, spec in self.specs.items()})
        hw, valid = np.zeros((n, 2), dtype=np.int32), np.zeros(n, dtype=bool)
        for i in range(n):  # one decoded image alive at a time (see _Transform._render)
            im = (frames.image(i) if frames is not None else
                  decode_or_none(batch["image"][i], str(batch["key"][i]), self.max_pixels, self.draft_side))
            if im is None:
                continue
            valid[i], hw[i] = True, im.size
            if gpu:
                side = self.decode_side
                out["decoded"][i] = _chw(im.resize((side, side), Image.Resampling.BILINEAR))
            for name, spec in ({} if gpu else self.specs).items():
                x0, y0, w, h = (int(v) for v in sample_crops(hw[i, :1], hw[i, 1:], spec.scale, spec.ratio,
                                                             self.rng)[0])
                out[name][i] = _chw(im.resize((spec.size, spec.size), self.resample, box=(x0, y0, x0 + w, y0 + h)))
            del im
        if gpu:
            out["decoded_hw"] = hw
        elif valid.any():
            rows = torch.from_numpy(np.flatnonzero(valid))
            for name, spec in self.specs.items():
                views = torch.from_numpy(out[name])
                views[rows] = augment_uint8(views[rows], spec, self.rng)
        return _finish(out, valid, columns)


def two_view_specs(image_size: int, *, crop_scale: tuple[float, float], flip_p: float,
                   jitter: tuple[float, float, float, float], jitter_p: float, gray_p: float,
                   blur_p: tuple[float, float], solarize_p: tuple[float, float]) -> dict[str, ViewSpec]:
    """BYOL's two asymmetric views (paper, Table 6): they differ in blur and solarize probabilities."""
    return {f"view{i + 1}": ViewSpec(image_size, crop_scale, flip_p=flip_p, jitter=jitter, jitter_p=jitter_p,
                                     gray_p=gray_p, blur_p=blur_p[i], solarize_p=solarize_p[i]) for i in (0, 1)}


def TwoViews(image_size: int, max_pixels: int, *, on: str = "cpu", decode_side: int | None = None,
             **augment: Any) -> CropViews:
    """BYOL: two differently augmented views of each image (`view1`, `view2`); `augment`: two_view_specs'."""
    return CropViews(max_pixels, two_view_specs(image_size, **augment), on=on, decode_side=decode_side)


def one_view_spec(image_size: int, *, crop_scale: tuple[float, float], flip_p: float) -> dict[str, ViewSpec]:
    """I-JEPA and CLIP: one random resized crop and a flip; no hand-crafted augmentations (I-JEPA's point)."""
    return {"image": ViewSpec(image_size, crop_scale, flip_p=flip_p)}


def OneView(image_size: int, max_pixels: int, *, crop_scale: tuple[float, float], flip_p: float, on: str = "cpu",
            decode_side: int | None = None) -> CropViews:
    return CropViews(max_pixels, one_view_spec(image_size, crop_scale=crop_scale, flip_p=flip_p), on=on,
                     decode_side=decode_side)


class ImageText:
    """CLIP: OneView's crop and flip of the image, plus the caption tokenized here, on Ray Data's CPU workers.

    A sample is valid only if its image decodes and its caption is not empty; the rest are counted.
    """

    def __init__(self, image_size: int, max_pixels: int, *, crop_scale: tuple[float, float], flip_p: float,
                 context_length: int, on: str = "cpu", decode_side: int | None = None) -> None:
        self.views = OneView(image_size, max_pixels, crop_scale=crop_scale, flip_p=flip_p, on=on,
                             decode_side=decode_side)
        self.context_length = context_length

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raysl.data.tokenizer import get_tokenizer

        out = self.views(batch)
        captions = [str(c) if c is not None else "" for c in batch["caption"]]
        has_text = np.array([bool(c.strip()) for c in captions], dtype=bool)
        out["text"] = get_tokenizer(self.context_length).encode(captions)  # (N, L) int32
        out["valid"] = out["valid"] & has_text
        return out


class LabeledView(_Transform):
    """Supervised fine-tuning: random resized crop, flip and optionally TrivialAugment/RandAugment; the label
    name becomes its index in `classes`. A label outside `classes` is a bad sample, counted like an image that
    does not decode."""

    def __init__(self, image_size: int, max_pixels: int, *, classes: Sequence[str], crop_scale: tuple[float, float],
                 flip_p: float, auto_augment: str = "none") -> None:
        super().__init__(image_size, max_pixels)
        self.draft_side = crop_draft_side(image_size, crop_scale[0])
        self.index = {c: i for i, c in enumerate(classes)}
        extra = {"none": [], "trivial": [T.TrivialAugmentWide()], "randaugment": [T.RandAugment()]}[auto_augment]
        self.pipe = T.Compose([T.RandomResizedCrop(image_size, scale=crop_scale, antialias=True),
                               T.RandomHorizontalFlip(flip_p), *extra, T.PILToTensor()])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self._render(batch, {"image": self.pipe})
        labels = np.array([self.index.get(str(v), -1) for v in batch["label"]], dtype=np.int64)
        out["valid"] = out["valid"] & (labels >= 0)
        out["label"] = np.maximum(labels, 0)
        return out


def keep_keys(batch: dict[str, np.ndarray], keys: frozenset[str]) -> dict[str, np.ndarray]:
    """Rows whose key is in `keys` (a labeled subset), before anything is decoded."""
    keep = np.array([str(k) in keys for k in batch["key"]], dtype=bool)
    return {k: np.asarray(v)[keep] for k, v in batch.items()}


class EvalView(_Transform):
    """Evaluation and embedding: decode and resize to the encoder's image size, no augmentation.

    A JPEG is drafted to no less than S on each side: the resize to S×S then only ever shrinks it."""

    def __init__(self, image_size: int, max_pixels: int) -> None:
        super().__init__(image_size, max_pixels)
        self.draft_side = image_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        s = self.size
        return self._render(batch, {"image": lambda im: im if im.size == (s, s) else
                                    im.resize((s, s), Image.Resampling.BICUBIC)})


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B,3,H,W) → float, normalized; done on the training worker (or its GPU)."""
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    sd = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x.float() / 255.0) - m) / sd
