"""COCO mAP via pycocotools: hand-computed cases (perfect, a false positive ranked first, a box at IoU 0.62),
per-class keys, empty predictions, and the xyxy → xywh conversion."""

import numpy as np
import pytest
import torch
from torchvision.ops import box_convert

from raysl.eval.detection import coco_map, to_coco

NAMES = ["square", "disc"]


def _gt() -> list[dict]:
    return [
        {"image_id": 1, "boxes": np.array([[2.0, 3.0, 20.0, 30.0], [30.0, 30.0, 60.0, 50.0]]),
         "labels": np.array([1, 2])},
        {"image_id": 2, "boxes": torch.tensor([[10.0, 10.0, 40.0, 44.0]]), "labels": torch.tensor([1])},
        {"image_id": 3, "boxes": np.zeros((0, 4)), "labels": np.zeros((0,), dtype=int)},  # an image with nothing
    ]


def _perfect(gt: list[dict]) -> list[dict]:
    return [{**g, "scores": np.full(len(g["labels"]), 0.9)} for g in gt]


def test_perfect_predictions_score_one() -> None:
    gt = _gt()
    m = coco_map(gt, _perfect(gt), NAMES)
    assert m["map"] == pytest.approx(1.0) and m["map_50"] == pytest.approx(1.0) and m["map_75"] == pytest.approx(1.0)
    assert m["ap/square"] == pytest.approx(1.0) and m["ap/disc"] == pytest.approx(1.0)


def test_false_positive_ranked_first_halves_ap() -> None:
    # ranks: FP (P=0, R=0), TP (P=1/2, R=1); the interpolated precision is 1/2 at all 101 recall points
    gt = [{"image_id": 7, "boxes": np.array([[10.0, 10.0, 30.0, 30.0]]), "labels": np.array([1])}]
    pred = [{"image_id": 7, "boxes": np.array([[40.0, 40.0, 60.0, 60.0], [10.0, 10.0, 30.0, 30.0]]),
             "scores": np.array([0.9, 0.5]), "labels": np.array([1, 1])}]
    m = coco_map(gt, pred, ["thing"])
    assert m["map"] == pytest.approx(0.5) and m["map_50"] == pytest.approx(0.5) and m["ap/thing"] == pytest.approx(0.5)
    # the same FP ranked last costs nothing: precision is 1 up to recall 1
    pred[0]["scores"] = np.array([0.1, 0.5])
    assert coco_map(gt, pred, ["thing"])["map"] == pytest.approx(1.0)


def test_box_at_iou_062_counts_at_50_not_75() -> None:
    gt = [{"image_id": 1, "boxes": np.array([[0.0, 0.0, 10.0, 10.0]]), "labels": np.array([1])}]
    pred = [{"image_id": 1, "boxes": np.array([[0.0, 0.0, 10.0, 6.2]]), "scores": np.array([0.8]),
             "labels": np.array([1])}]  # IoU = 62 / 100
    m = coco_map(gt, pred, ["thing"])
    assert m["map_50"] == pytest.approx(1.0) and m["map_75"] == 0.0
    assert m["map"] == pytest.approx(3 / 10)  # matched at .50, .55, .60 of the ten thresholds .50:.05:.95


def test_per_class_keys_skip_classes_without_ground_truth() -> None:
    gt = _gt()
    preds = _perfect(gt)
    preds[0] = {**preds[0], "labels": np.array([1, 3])}  # a "ghost" prediction for a class with no ground truth
    m = coco_map(gt, preds, [*NAMES, "ghost"])
    assert set(m) == {"map", "map_50", "map_75", "ap/square", "ap/disc"}
    assert m["ap/disc"] == 0.0 and m["ap/square"] == pytest.approx(1.0)
    assert not any(np.isnan(v) for v in m.values())
    assert m["map"] == pytest.approx(0.5)  # the mean over the two classes with ground truth


def test_empty_predictions_give_zero() -> None:
    m = coco_map(_gt(), [], NAMES)
    assert m == {"map": 0.0, "map_50": 0.0, "map_75": 0.0, "ap/square": 0.0, "ap/disc": 0.0}
    no_boxes = [{"image_id": 1, "boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, dtype=int)}]
    assert coco_map(_gt(), no_boxes, NAMES)["map"] == 0.0


def test_xyxy_to_xywh_round_trips() -> None:
    gt = _gt()
    coco_gt, coco_dt = to_coco(gt, _perfect(gt), NAMES)
    for coco in (coco_gt, coco_dt):
        anns = [a for a in coco.dataset["annotations"] if a["image_id"] == 1]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64)
        assert xywh[0].tolist() == [2.0, 3.0, 18.0, 27.0]
        assert torch.equal(box_convert(xywh, "xywh", "xyxy"), torch.as_tensor(gt[0]["boxes"]))
        assert [a["area"] for a in anns] == [18.0 * 27.0, 30.0 * 20.0]
    assert sorted(coco_gt.getImgIds()) == [1, 2, 3] and min(a["id"] for a in coco_gt.dataset["annotations"]) == 1


def test_rejects_bad_labels_and_unknown_images() -> None:
    gt = _gt()
    with pytest.raises(ValueError, match="outside 1..2"):
        coco_map(gt, [{**_perfect(gt)[0], "labels": np.array([0, 1])}], NAMES)
    with pytest.raises(ValueError, match="without a ground-truth"):
        coco_map(gt, [{**_perfect(gt)[0], "image_id": 99}], NAMES)
