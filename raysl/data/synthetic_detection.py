"""A detection set made on the fly: objects pasted on textured backgrounds, with their boxes, in COCO format.

Objects are scikit-learn's 8×8 digits (upscaled, coloured, pasted through their own stroke mask, so each box
is tight around the pixels it names) or crops from a folder of class sub-folders (e.g. CIFAR-10 JPEGs,
pasted whole, so the box is the crop). Backgrounds are textures (smooth noise, stripes, gradients), never a
flat colour, so a detector cannot find objects by colour edges alone. Some images hold no object at all.
Images are PNG (lossless: a box stays tight after a decode). Everything is deterministic given the seed.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from raysl.data.detection import write_coco

log = logging.getLogger(__name__)

FOLDER_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class ObjectPool:
    """Where objects come from: class names and, per instance, its class and how to load it."""

    classes: list[str]
    labels: np.ndarray  # class index of each instance
    sources: list[Any]  # digits: (8,8) arrays; folders: file paths
    kind: str  # "digits" or "folder"

    def subset(self, idx: np.ndarray) -> ObjectPool:
        return ObjectPool(self.classes, self.labels[idx], [self.sources[i] for i in idx], self.kind)


def object_pool(objects: str) -> ObjectPool:
    if objects == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return ObjectPool([str(c) for c in range(10)], d.target.astype(np.int64), list(d.images), "digits")
    root = Path(objects)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise ValueError(f"objects: {objects!r} is neither 'digits' nor a folder of class sub-folders")
    labels, sources = [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in FOLDER_SUFFIXES)
        labels += [c] * len(files)
        sources += files
    return ObjectPool(classes, np.asarray(labels, np.int64), sources, "folder")


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size,size,3) float background in [0,255]: smooth noise, stripes or a gradient, plus grain."""
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == 0:  # smooth noise: a coarse random grid upsampled bicubically
        cells = int(rng.integers(3, 7))
        coarse = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), np.float32)
    else:
        if kind == 1:  # stripes at a random angle and frequency
            angle, freq = rng.uniform(0, np.pi), rng.uniform(2, 8)
            t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
        else:  # a linear gradient in a random direction
            angle = rng.uniform(0, 2 * np.pi)
            t = xx * np.cos(angle) + yy * np.sin(angle)
            t = (t - t.min()) / (np.ptp(t) or 1.0)
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        base = a * (1 - t[..., None]) + b * t[..., None]
    return np.clip(base + rng.normal(0, 6, (size, size, 3)), 0, 255)


def _load(pool: ObjectPool, i: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Instance i scaled for a size×size image: (h,w,3) float pixels and an (h,w) bool mask of the object.

    Digits come back as a grey shade in [0.6, 1] (the caller picks a colour that stands out from the spot
    it lands on); folder crops come back as their own pixels, at 0.6–1.5× their size.
    """
    if pool.kind == "digits":
        side = max(6, int(rng.uniform(0.2, 0.5) * size))
        grey = Image.fromarray((pool.sources[i] * (255 / 16)).astype(np.uint8))
        a = np.asarray(grey.resize((side, side), Image.Resampling.BILINEAR), np.float32) / 255
        return np.repeat(0.6 + 0.4 * a[..., None], 3, axis=2), a > 0.3
    with Image.open(pool.sources[i]) as f:
        im = f.convert("RGB")
    w, h = im.size
    k = min(rng.uniform(0.6, 1.5), size / max(w, h))
    im = im.resize((max(1, round(w * k)), max(1, round(h * k))), Image.Resampling.BILINEAR)
    px = np.asarray(im, np.float32)
    return px, np.ones(px.shape[:2], bool)


def _contrasting(rng: np.random.Generator, behind: np.ndarray) -> np.ndarray:
    """A colour far from the mean of the background it lands on, so every pasted digit is visible."""
    mean = behind.reshape(-1, 3).mean(axis=0)
    colour = rng.uniform(0, 255, 3)
    for _ in range(10):
        if np.linalg.norm(colour - mean) > 120:
            break
        colour = rng.uniform(0, 255, 3)
    else:
        colour = np.where(mean > 127, 0.0, 255.0)  # the opposite corner of the colour cube
    return colour


def _overlaps(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]], limit: float) -> bool:
    """True if box covers more than `limit` of a placed box or vice versa (occluded objects make bad labels)."""
    x1, y1, x2, y2 = box
    for a1, b1, a2, b2 in boxes:
        inter = max(0, min(x2, a2) - max(x1, a1)) * max(0, min(y2, b2) - max(y1, b1))
        if inter > limit * min((x2 - x1) * (y2 - y1), (a2 - a1) * (b2 - b1)):
            return True
    return False


def render_scene(pool: ObjectPool, rng: np.random.Generator, size: int, max_objects: int,
                 ) -> tuple[np.ndarray, list[tuple[int, int, int, int]], list[int], list[np.ndarray]]:
    """One image: uint8 (size,size,3), xyxy boxes (exclusive ends), class indices, and each object's
    full-image mask (what was pasted), so tests can check the boxes are tight."""
    img = texture(rng, size)
    boxes: list[tuple[int, int, int, int]] = []
    labels: list[int] = []
    masks: list[np.ndarray] = []
    for _ in range(int(rng.integers(0, max_objects + 1))):  # 0 objects: a negative image
        i = int(rng.integers(len(pool.sources)))
        px, mask = _load(pool, i, size, rng)
        ys, xs = np.nonzero(mask)
        if len(ys) == 0:
            continue
        h, w = mask.shape
        for _try in range(20):
            x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            box = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
            if not _overlaps(box, boxes, 0.2):
                break
        else:
            continue  # no free place left: fewer objects in this image
        region = img[y0:y0 + h, x0:x0 + w]
        if pool.kind == "digits":
            px = px * _contrasting(rng, region[mask])
        region[mask] = px[mask]
        full = np.zeros((size, size), bool)
        full[y0:y0 + h, x0:x0 + w] = mask
        boxes.append(box)
        labels.append(int(pool.labels[i]))
        masks.append(full)
    return np.clip(img, 0, 255).astype(np.uint8), boxes, labels, masks


def _write(root: Path, pool: ObjectPool, n_images: int, image_size: int, seed: int, max_objects: int) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for n in range(n_images):
        arr, boxes, labels, _ = render_scene(pool, rng, image_size, max_objects)
        name = f"images/{n:06d}.png"
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        (root / name).write_bytes(buf.getvalue())
        images.append({"id": n + 1, "file_name": name, "width": image_size, "height": image_size})
        annotations += [{"image_id": n + 1, "category_id": c + 1, "bbox": [x1, y1, x2 - x1, y2 - y1]}
                        for (x1, y1, x2, y2), c in zip(boxes, labels, strict=True)]
    categories = [{"id": c + 1, "name": name} for c, name in enumerate(pool.classes)]
    write_coco(root, images, annotations, categories)
    log.info("wrote %d images with %d boxes to %s", n_images, len(annotations), root)
    return root


def write_detection_set(root: Path, *, n_images: int, image_size: int = 64, objects: str = "digits", seed: int = 0,
                        max_objects: int = 4) -> Path:
    """PNG images under root/images and root/annotations.json (COCO; categories = object classes). → root."""
    return _write(root, object_pool(objects), n_images, image_size, seed, max_objects)


def split_pool(pool: ObjectPool, seed: int, test_fraction: float) -> tuple[ObjectPool, ObjectPool]:
    """Disjoint (train, test) instance pools: a seeded permutation, the first `test_fraction` held out."""
    order = np.random.default_rng(seed).permutation(len(pool.sources))
    cut = min(len(order) - 1, max(1, int(len(order) * test_fraction)))
    return pool.subset(order[cut:]), pool.subset(order[:cut])


def write_detection_splits(root: Path, n_train: int, n_test: int, *, image_size: int = 64, objects: str = "digits",
                           seed: int = 0, max_objects: int = 4, test_fraction: float = 0.25) -> dict[str, Path]:
    """root/train and root/test, whose object instances are disjoint (`test_fraction` of them held out)."""
    train, test = split_pool(object_pool(objects), seed, test_fraction)
    parts = {"train": (train, n_train, seed + 1), "test": (test, n_test, seed + 2)}
    return {split: _write(root / split, p, n, image_size, s, max_objects) for split, (p, n, s) in parts.items()}
