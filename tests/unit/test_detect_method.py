"""Detection as a Method, in process: COCO files → DetectionView → the detector's losses, gradients into the
encoder, export and rebuild of the whole detector, and category checks before any worker starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from raysl.config import parse_config
from raysl.data.detection import parse_coco
from raysl.data.synthetic_detection import write_detection_set
from raysl.methods import get_method
from raysl.methods.base import export_config
from raysl.methods.detect import Detector
from raysl.methods.export import load_full_dir
from raysl.models.files import save_full_dir
from raysl.storage import S3Settings


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_detection_set(tmp_path_factory.mktemp("det"), n_images=8, image_size=64, seed=1)


def _cfg(folder: Path, arch: str = "fasterrcnn", classes: list[str] | None = None):
    names = classes or [n for _, n in parse_coco((folder / "annotations.json").read_bytes(), "x")[1].categories]
    return parse_config({"data": {"uri": str(folder)},
                         "model": {"backbone": "resnet18", "image_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3},
                         "method": {"name": "detect", "classes": names, "init": "random", "arch": arch}})


def _batch(cfg, folder: Path) -> dict[str, torch.Tensor]:
    index = parse_coco((folder / "annotations.json").read_bytes(), "x")[0]
    images = np.array([(folder / r.file_name).read_bytes() for r in index], dtype=object)
    flat = {"image": images, "key": np.array([r.file_name for r in index]),
            "image_id": np.array([r.image_id for r in index]),
            "boxes": np.array([r.boxes.reshape(-1) for r in index] + [None], dtype=object)[:-1],
            "labels": np.array([r.labels for r in index] + [None], dtype=object)[:-1]}
    raw = get_method("detect").view_transform(cfg)(flat)
    return {c: torch.from_numpy(raw[c]) for c in Detector.batch_columns}


@pytest.mark.parametrize("arch", ["fasterrcnn", "retinanet"])
def test_losses_reach_the_encoder(coco: Path, arch: str) -> None:
    cfg = _cfg(coco, arch)
    torch.manual_seed(0)
    m = Detector(cfg)
    batch = _batch(cfg, coco)
    assert int(batch["num_boxes"].sum()) > 0
    out = m.forward_backward(m, batch)
    assert torch.isfinite(out["loss"]) and len(out) > 2  # the total and each of the detector's losses
    assert m.backbone.conv1.weight.grad is not None and m.backbone.conv1.weight.grad.abs().sum() > 0
    assert m.encoder() is m.backbone and m.detector.backbone.body is m.backbone
    preds = m.predict(batch["image"].numpy()[:2])
    assert len(preds) == 2 and all(set(p) == {"boxes", "scores", "labels"} for p in preds)
    assert all(((p["labels"] >= 1) & (p["labels"] <= len(m.classes))).all() for p in preds)


def test_whole_detector_round_trips(coco: Path, tmp_path: Path) -> None:
    cfg = _cfg(coco)
    cfg.method.init_weights = "/a/file/the/rebuild/must/not/read"  # type: ignore[union-attr]
    cfg.method.init = "pretrained"  # type: ignore[union-attr]
    m = Detector(_cfg(coco)).eval()
    save_full_dir(tmp_path, m, export_config(cfg))
    loaded, tree = load_full_dir(tmp_path)
    assert tree["method"]["init_weights"] is None and tree["method"]["init"] == "random"
    x = _batch(cfg, coco)["image"].numpy()[:3]
    a, b = m.predict(x), loaded.predict(x)  # type: ignore[operator]
    for p, q in zip(a, b, strict=True):
        np.testing.assert_allclose(p["boxes"], q["boxes"], atol=1e-4)


def test_categories_must_match_before_workers_start(coco: Path) -> None:
    Detector.check_source(_cfg(coco), S3Settings())
    with pytest.raises(ValueError, match="differ from method.classes"):
        Detector.check_source(_cfg(coco, classes=["cat", "dog"]), S3Settings())
    with pytest.raises(ValueError, match="freeze_steps"):
        Detector(parse_config({**_cfg(coco).model_dump(mode="json"),
                               "method": {**_cfg(coco).method.model_dump(), "freeze_steps": 5}}))
