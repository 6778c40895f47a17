"""COCO-style box mAP with pycocotools (https://cocodataset.org/#detection-eval), on in-memory COCO objects.

Ground truth and predictions come as per-image dicts of xyxy boxes with labels 1..C (torchvision's detector
convention); they are converted to COCO's xywh and evaluated with COCOeval's standard settings: IoU thresholds
.50:.05:.95, 101-point interpolated precision, area range "all", at most 100 detections per image.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert

log = logging.getLogger(__name__)

Detections = dict[str, Any]  # {"image_id": int, "boxes": (n, 4) xyxy, "labels": (n,), ["scores": (n,)]}


def _xywh(boxes: Any) -> list[list[float]]:
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float64)).reshape(-1, 4)
    out: list[list[float]] = box_convert(b, "xyxy", "xywh").tolist()
    return out


def _ints(values: Any) -> list[int]:
    return [int(v) for v in np.asarray(values).reshape(-1)]


def _coco(images: list[dict[str, int]], categories: list[dict[str, Any]], anns: list[dict[str, Any]]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco


def to_coco(ground_truth: Sequence[Detections], predictions: Sequence[Detections],
            category_names: Sequence[str]) -> tuple[COCO, COCO]:
    """In-memory COCO objects for the ground truth and the detections (boxes as xywh, area = w·h).

    Annotation ids start at 1: COCOeval stores matched ids in arrays where 0 means "unmatched".
    """
    n_cls = len(category_names)
    image_ids = sorted({int(g["image_id"]) for g in ground_truth})
    unknown = {int(p["image_id"]) for p in predictions} - set(image_ids)
    if unknown:
        raise ValueError(f"predictions for images without a ground-truth entry: {sorted(unknown)[:5]}")
    images = [{"id": i} for i in image_ids]
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(category_names)]

    def anns(items: Sequence[Detections], scored: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for item in items:
            boxes, labels = _xywh(item["boxes"]), _ints(item["labels"])
            scores = [float(s) for s in np.asarray(item["scores"]).reshape(-1)] if scored else [1.0] * len(boxes)
            if not len(boxes) == len(labels) == len(scores):
                raise ValueError(f"image {item['image_id']}: boxes, labels (and scores) differ in length")
            for box, label, score in zip(boxes, labels, scores, strict=True):
                if not 1 <= label <= n_cls:
                    raise ValueError(f"label {label} outside 1..{n_cls} (category_names has {n_cls} entries)")
                ann = {"id": len(out) + 1, "image_id": int(item["image_id"]), "category_id": label, "bbox": box,
                       "area": box[2] * box[3], "iscrowd": 0}
                if scored:
                    ann["score"] = score
                out.append(ann)
        return out

    return (_coco(images, categories, anns(ground_truth, scored=False)),
            _coco(images, categories, anns(predictions, scored=True)))


def _mean_valid(precision: np.ndarray) -> float:
    """Mean over entries COCOeval filled in (-1 marks classes without ground truth), as its summarize() does."""
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else 0.0


def coco_map(ground_truth: list[dict], predictions: list[dict], category_names: list[str]) -> dict[str, float]:
    """COCO box AP: `map` (AP@[.5:.95]), `map_50`, `map_75`, and `ap/<name>` (AP@[.5:.95]) for every class that has
    ground truth. Ground-truth items may have no boxes; no predictions at all gives 0.0 throughout."""
    gt, dt = to_coco(ground_truth, predictions, category_names)
    class_ids = sorted({a["category_id"] for a in gt.dataset["annotations"]})
    if not class_ids or not dt.dataset["annotations"]:
        if not class_ids:
            log.warning("coco_map: the ground truth has no boxes; mAP is reported as 0.0")
        return {"map": 0.0, "map_50": 0.0, "map_75": 0.0, **{f"ap/{category_names[k - 1]}": 0.0 for k in class_ids}}
    ev = COCOeval(gt, dt, iouType="bbox")
    with contextlib.redirect_stdout(io.StringIO()):  # evaluate() and accumulate() print timings
        ev.evaluate()
        ev.accumulate()
    # precision: (IoU thresholds, recall points, classes, area ranges, max dets); area "all" is 0, 100 dets is -1
    prec = ev.eval["precision"][:, :, :, 0, -1]
    iou = ev.params.iouThrs
    out = {"map": _mean_valid(prec), "map_50": _mean_valid(prec[np.isclose(iou, 0.5)]),
           "map_75": _mean_valid(prec[np.isclose(iou, 0.75)])}
    for k, cat in enumerate(ev.params.catIds):
        if cat in class_ids:
            out[f"ap/{category_names[cat - 1]}"] = _mean_valid(prec[:, :, k])
    return out
