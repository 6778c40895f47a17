"""Object detection data: COCO-format annotations beside an image folder → a Ray Data stream of images and boxes.

The JSON is read and validated on the driver (`parse_coco`, a pure function), so a broken file fails before any
worker starts and every box that is clipped or skipped is counted in a `CocoIndex` for MLflow. Ray Data then
reads the image files and joins each row with its boxes. Boxes travel as flat `list<float32>` (x1,y1,x2,y2, …)
in ORIGINAL pixel coordinates; `DetectionView` decodes, resizes, flips and pads them to fixed-size arrays.
Category ids map to labels 1..C in ascending id order; 0 is the background, as torchvision detectors expect.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray.data
import torch
from PIL import Image

from raysl.data.views import _Transform, decode_or_none
from raysl.storage import S3Settings, StorageError, is_s3, list_files, read_bytes, redact, resolve

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("images", "annotations", "categories")


@dataclass
class CocoIndex:
    """Categories in label order and what parsing kept, clipped and skipped (logged to MLflow via counts())."""

    categories: list[tuple[int, str]] = field(default_factory=list)  # (coco id, name); label = position + 1
    label_of_category: dict[int, int] = field(default_factory=dict)
    images: int = 0  # images the Dataset yields
    boxes: int = 0  # boxes the Dataset yields
    clipped_boxes: int = 0
    skipped_degenerate: int = 0
    skipped_unknown_category: int = 0
    skipped_no_image: int = 0
    skipped_crowd: int = 0  # iscrowd=1 regions are not objects to train on; COCO evaluation ignores them too
    missing_images: int = 0

    @property
    def num_classes(self) -> int:
        """Foreground classes plus the background, the size torchvision detectors take."""
        return len(self.categories) + 1

    def counts(self) -> dict[str, int]:
        return {f.name: int(getattr(self, f.name)) for f in fields(self) if f.type == "int"}


@dataclass
class CocoImage:
    """One image's entry and its kept boxes: xyxy float32 (n,4) in original pixels, labels int64 (n,)."""

    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray


def _field(entry: Any, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(entry, dict) or name not in entry:
        raise ValueError(f"{where}: missing field {name!r}")
    value = entry[name]
    # bool is an int subclass; a true/false id or size is a broken file, not a number
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{where}: field {name!r} should be a number" if isinstance(kind, tuple) else
                         f"{where}: field {name!r} should be {kind.__name__}, got {value!r}")
    return value


def _categories(cats: list[Any], where: str) -> tuple[list[tuple[int, str]], dict[int, int]]:
    seen: dict[int, str] = {}
    for i, c in enumerate(cats):
        cid = _field(c, "id", int, f"{where} categories[{i}]")
        if cid in seen:
            raise ValueError(f"{where}: category id {cid} appears twice")
        seen[cid] = str(c.get("name", cid))
    ordered = sorted(seen.items())
    return ordered, {cid: label for label, (cid, _) in enumerate(ordered, start=1)}


def _images(entries: list[Any], where: str) -> dict[int, CocoImage]:
    out: dict[int, CocoImage] = {}
    names: set[str] = set()
    for i, e in enumerate(entries):
        at = f"{where} images[{i}]"
        iid, name = _field(e, "id", int, at), _field(e, "file_name", str, at)
        # some exporters write sizes as floats (640.0); they are still whole pixels
        w, h = (int(_field(e, k, (int, float), at)) for k in ("width", "height"))
        if w <= 0 or h <= 0:
            raise ValueError(f"{at}: size {w}x{h} is not positive")
        if iid in out:
            raise ValueError(f"{where}: image id {iid} appears twice")
        if name in names:  # rows join their boxes by file name, so two entries for one file are ambiguous
            raise ValueError(f"{where}: file_name {name!r} appears twice")
        names.add(name)
        out[iid] = CocoImage(iid, name, w, h, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    return out


def _bbox(ann: dict[str, Any], at: str) -> list[float]:
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        raise ValueError(f"{at}: bbox should be [x, y, width, height], got {bbox!r}")
    return [float(v) for v in bbox]


def parse_coco(raw: bytes, source: str) -> tuple[list[CocoImage], CocoIndex]:
    """COCO JSON bytes → one record per listed image (in file order) with its clipped, filtered boxes.

    `source` names the file in errors (redacted). Structural faults raise ValueError; box-level faults are
    skipped and counted, since one stray annotation should not stop a job over a million images.
    """
    where = redact(source)
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: not UTF-8 text (byte {exc.start}): {exc.reason}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: top level should be a JSON object with keys {list(REQUIRED_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in doc]
    if missing:
        raise ValueError(f"{where}: not a COCO detection file; missing top-level key(s) {missing} "
                         f"(has {sorted(doc)[:10]})")
    not_lists = [k for k in REQUIRED_KEYS if not isinstance(doc[k], list)]
    if not_lists:
        raise ValueError(f"{where}: {not_lists} should be list(s)")

    index = CocoIndex()
    index.categories, index.label_of_category = _categories(doc["categories"], where)
    images = _images(doc["images"], where)
    boxes: dict[int, list[list[float]]] = {iid: [] for iid in images}
    labels: dict[int, list[int]] = {iid: [] for iid in images}
    for i, ann in enumerate(doc["annotations"]):
        at = f"{where} annotations[{i}]"
        iid = _field(ann, "image_id", int, at)
        cid = _field(ann, "category_id", int, at)
        x, y, w, h = _bbox(ann, at)
        img = images.get(iid)
        if img is None:
            index.skipped_no_image += 1
            continue
        x1, y1 = max(x, 0.0), max(y, 0.0)
        x2, y2 = min(x + w, float(img.width)), min(y + h, float(img.height))
        if cid not in index.label_of_category:
            index.skipped_unknown_category += 1
        elif ann.get("iscrowd", 0):
            index.skipped_crowd += 1
        elif not (x2 > x1 and y2 > y1):  # written so that NaN coordinates land here too
            index.skipped_degenerate += 1
        else:
            index.clipped_boxes += (x1, y1, x2, y2) != (x, y, x + w, y + h)
            boxes[iid].append([x1, y1, x2, y2])
            labels[iid].append(index.label_of_category[cid])
    for iid, img in images.items():
        if boxes[iid]:
            img.boxes = np.asarray(boxes[iid], dtype=np.float32)
            img.labels = np.asarray(labels[iid], dtype=np.int64)
    records = list(images.values())
    index.images, index.boxes = len(records), sum(len(r.labels) for r in records)
    return records, index


def write_coco(root: Path, images: list[dict[str, Any]], annotations: list[dict[str, Any]],
               categories: list[dict[str, Any]], name: str = "annotations.json") -> Path:
    """Write a COCO detection file (annotation ids are filled in where absent); returns its path."""
    anns = [{"id": i, "iscrowd": 0, **a} for i, a in enumerate(annotations, start=1)]
    for a in anns:
        a.setdefault("area", float(a["bbox"][2]) * float(a["bbox"][3]))
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return path


def _join(batch: pa.Table, targets: dict[str, tuple[int, str, list[float], list[int]]]) -> pa.Table:
    """Ray Data map fn: attach image_id, boxes (flat xyxy) and labels to each file row, by its path."""
    got = [targets[os.path.normpath(p)] for p in batch.column("path").to_pylist()]
    return pa.table({
        "image": batch.column("bytes"),
        "key": pa.array([t[1] for t in got], pa.string()),
        "image_id": pa.array([t[0] for t in got], pa.int64()),
        "boxes": pa.array([t[2] for t in got], pa.list_(pa.float32())),
        "labels": pa.array([t[3] for t in got], pa.list_(pa.int64())),
    })


def read_coco(uri: str, *, s3: S3Settings | None = None, annotations: str = "annotations.json",
              limit: int | None = None) -> tuple[ray.data.Dataset, CocoIndex]:
    """A COCO folder (local or s3://) → ({image, key, image_id, boxes, labels} rows, the parse counters).

    `boxes` is list<float32> of length 4n (x1,y1,x2,y2 per box, original pixels); `labels` list<int64> of n.
    Images listed in the JSON but absent from the folder are counted and left out, not fatal. With `limit`,
    only the first `limit` images are read; `images`/`boxes` count those, the skip counters the whole file.
    """
    s3 = s3 or S3Settings.resolve()
    root = uri.rstrip("/")
    json_uri = f"{root}/{annotations}"
    try:
        raw = read_bytes(json_uri, s3)
    except Exception as exc:  # pyarrow raises FileNotFoundError / OSError with the endpoint's reply
        raise StorageError(f"cannot read COCO annotations {redact(json_uri)!r}: {exc}") from exc
    records, index = parse_coco(raw, json_uri)
    if limit is not None:
        records = records[:limit]
    fs, base = resolve(root, s3)
    join = posixpath.join if is_s3(uri) else os.path.join
    present = {os.path.normpath(p) for p in list_files(root, s3)}
    paths: list[str] = []
    targets: dict[str, tuple[int, str, list[float], list[int]]] = {}
    missing: list[str] = []
    for r in records:
        path = os.path.normpath(join(base, r.file_name))
        if path not in present:
            missing.append(r.file_name)
            continue
        paths.append(path)
        targets[path] = (r.image_id, r.file_name, r.boxes.reshape(-1).tolist(), r.labels.tolist())
    index.missing_images, index.images = len(missing), len(paths)
    index.boxes = sum(len(t[3]) for t in targets.values())
    if missing:
        log.warning("%d image(s) listed in %s are not in the folder (e.g. %s); left out",
                    len(missing), redact(json_uri), missing[:3])
    if not paths:
        raise StorageError(f"none of the {len(records)} image(s) listed in {redact(json_uri)!r} are in the folder")
    log.info("COCO %s: %s", redact(uri), index.counts())
    ds = ray.data.read_binary_files(paths, filesystem=fs, include_paths=True)
    # pyarrow in and out: list<float32> columns stay native Arrow lists through blocks, shuffles and repartitions
    ds = ds.map_batches(_join, fn_kwargs={"targets": targets}, batch_format="pyarrow")  # type: ignore[arg-type]
    return ds, index


def _targets(boxes: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """One row's flat boxes and labels, whatever container Ray Data hands over (list, ndarray, object array)."""
    b, lab = np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64).reshape(-1)
    if len(b) != len(lab):
        raise ValueError(f"{len(b)} boxes but {len(lab)} labels")
    return b, lab


class DetectionView(_Transform):
    """Decode, resize to S×S (boxes scaled), flip in training (boxes mirrored), pad boxes to `max_boxes`.

    Out: image uint8 (N,3,S,S); boxes float32 (N,M,4) xyxy in resized pixels, zero-padded; labels int64 (N,M),
    -1-padded; num_boxes, dropped_boxes, image_id int64 (N,); valid bool (N,); key str (N,).
    Undecodable images are kept as zeros with valid=False and no boxes.
    """

    def __init__(self, image_size: int, max_pixels: int, *, max_boxes: int = 50, train: bool = False,
                 flip_p: float = 0.5, min_size: float = 1.0, seed: int | None = None) -> None:
        super().__init__(image_size, max_pixels)
        self.max_boxes = max_boxes
        self.flip_p = flip_p if train else 0.0
        self.min_size = min_size
        self.seed = seed

    def _rng(self, image_ids: np.ndarray) -> np.random.Generator:
        # Ray Data pickles this object into every task, so a generator made here would replay the same flips
        # in each task: draw fresh entropy per batch, or with a seed, derive it from the batch's images.
        if self.seed is None:
            return np.random.default_rng()
        return np.random.default_rng([self.seed, *(int(i) % 2**32 for i in image_ids)])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch.set_num_threads(1)
        n, s, m = len(batch["key"]), self.size, self.max_boxes
        valid = np.zeros(n, dtype=bool)
        rng = self._rng(batch["image_id"])
        out: dict[str, np.ndarray] = {
            "image": np.zeros((n, 3, s, s), np.uint8), "boxes": np.zeros((n, m, 4), np.float32),
            "labels": np.full((n, m), -1, np.int64), "num_boxes": np.zeros(n, np.int64),
            "dropped_boxes": np.zeros(n, np.int64),
        }
        for i in range(n):  # one image decoded at a time: memory bounded by the outputs, not the batch
            im = decode_or_none(batch["image"][i], str(batch["key"][i]), self.max_pixels)  # full size: boxes
            if im is None:
                continue
            valid[i] = True
            boxes, labels = _targets(batch["boxes"][i], batch["labels"][i])
            w, h = im.size
            if (w, h) != (s, s):
                im = im.resize((s, s), Image.Resampling.BILINEAR)
            boxes = boxes * np.array([s / w, s / h, s / w, s / h], np.float32)
            if self.flip_p and rng.random() < self.flip_p:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                boxes = np.stack([s - boxes[:, 2], boxes[:, 1], s - boxes[:, 0], boxes[:, 3]], axis=1)
            # the JSON's width/height may disagree with the file; clip again to the pixels actually there
            boxes = np.clip(boxes, 0.0, float(s))
            keep = ((boxes[:, 2] - boxes[:, 0]) >= self.min_size) & ((boxes[:, 3] - boxes[:, 1]) >= self.min_size)
            boxes, labels = boxes[keep], labels[keep]
            k = min(len(labels), m)
            out["image"][i] = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
            out["boxes"][i, :k], out["labels"][i, :k] = boxes[:k], labels[:k]
            out["num_boxes"][i], out["dropped_boxes"][i] = k, len(labels) - k
            del im
        dropped = int(out["dropped_boxes"].sum())
        if dropped:
            log.warning("dropped %d box(es) beyond max_boxes=%d in a batch of %d images", dropped, m, n)
        out["image_id"] = np.asarray(batch["image_id"], dtype=np.int64)
        out["valid"] = valid
        out["key"] = np.asarray(batch["key"])
        return out


def unpad_targets(boxes: torch.Tensor, labels: torch.Tensor, num_boxes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Padded batch columns → torchvision's list of {"boxes": (n,4) float, "labels": (n,) int64} targets."""
    return [{"boxes": boxes[i, :k].float(), "labels": labels[i, :k].long()}
            for i, k in enumerate(num_boxes.tolist())]
