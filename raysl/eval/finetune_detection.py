"""`raysl finetune --task detection`: a registered encoder → a torchvision detector trained on COCO-format data
(local or s3://) on the pretraining loop and launcher; COCO mAP (pycocotools) on the held-out split, per run,
logged to MLflow and tagged on the registered detector version."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from raysl import tracking
from raysl.config import PretrainConfig
from raysl.data.detection import DetectionView, parse_coco, read_coco
from raysl.eval.detection import coco_map
from raysl.eval.finetune import INITS, FinetuneReport, base_tree, prepare_source, run_inits
from raysl.methods.detect import Detector, check_categories
from raysl.methods.export import load_full_model
from raysl.storage import S3Settings, read_bytes, redact

log = logging.getLogger(__name__)


def evaluate_detector(model: Detector, cfg: PretrainConfig, test_uri: str, s3: S3Settings) -> dict[str, float]:
    """COCO mAP@[.5:.95], mAP@.5, mAP@.75 and per-class AP of `model` on a COCO split, at the training size.
    Boxes are compared in the resized frame: IoU is unchanged by a per-axis scale."""
    task = model.task
    ds, index = read_coco(test_uri, s3=s3, annotations=task.annotations)
    check_categories(cfg, [n for _, n in index.categories], test_uri)
    view = DetectionView(cfg.model.image_size, cfg.data.max_image_pixels, max_boxes=10_000, train=False)
    gt: list[dict[str, Any]] = []
    preds: list[dict[str, Any]] = []
    for batch in ds.map_batches(view, batch_size=64, batch_format="numpy").iter_batches(batch_size=64,
                                                                                           batch_format="numpy"):
        ok = batch["valid"].astype(bool)
        for i, det in zip(np.flatnonzero(ok), model.predict(batch["image"][ok]), strict=True):
            n = int(batch["num_boxes"][i])
            image_id = int(batch["image_id"][i])
            gt.append({"image_id": image_id, "boxes": batch["boxes"][i, :n], "labels": batch["labels"][i, :n]})
            preds.append({"image_id": image_id, **det})
    if not gt:
        raise ValueError(f"the test split {redact(test_uri)!r} has no decodable images")
    return coco_map(gt, preds, list(task.classes))


def finetune_detection(model_uri: str, data_uri: str, test_uri: str, *, arch: str = "fasterrcnn",
                       init: str = "both", steps: int = 200, batch_size: int = 16, lr: float = 1e-3,
                       freeze_steps: int = 0, layer_decay: float | None = None, num_workers: int = 2,
                       storage_path: str = "./raysl-runs", tracking_uri: str | None = None, seed: int = 0,
                       annotations: str = "annotations.json", image_size: int | None = None,
                       overrides: list[str] | None = None) -> FinetuneReport:
    s3 = S3Settings.resolve()
    uri = tracking.tracking_uri(tracking_uri)
    source = prepare_source(model_uri, uri, storage_path, s3)
    train_json = f"{data_uri.rstrip('/')}/{annotations}"
    _, index = parse_coco(read_bytes(train_json, s3), train_json)  # a broken file fails before any worker
    classes = [n for _, n in index.categories]
    counts = {k: v for k, v in index.counts().items() if v}
    log.info("detection: %s", " ".join(f"{k}={v}" for k, v in counts.items()))
    tree = base_tree(source, data_uri=data_uri, steps=steps, batch_size=batch_size, lr=lr, num_workers=num_workers,
                     storage_path=storage_path, seed=seed, tracking_uri=uri, experiment="raysl-finetune",
                     image_size=image_size)
    tree["method"] = {"name": "detect", "classes": classes, "arch": arch, "init_weights": source.weights_uri,
                      "freeze_steps": freeze_steps, "layer_decay": layer_decay, "annotations": annotations}

    def score(cfg: PretrainConfig, result: Any) -> dict[str, float]:
        ref = f"models:/{result.model_name}/{result.model_version}"
        if result.model_version == "unregistered":
            raise RuntimeError(f"run {result.run_name} did not register its detector; it is in {result.checkpoint_uri}")
        model, _ = load_full_model(ref, uri)
        assert isinstance(model, Detector)
        return evaluate_detector(model, cfg, test_uri, s3)

    inits = list(INITS) if init == "both" else [init]
    tags = {"raysl.task": "detection", "raysl.detector": arch}
    report = FinetuneReport("detection", model_uri, counts=counts)
    report.runs = run_inits(tree, inits, overrides or [], f"{source.base_name}-{arch}", tags, score)
    return report
