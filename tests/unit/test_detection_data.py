"""Detection data: COCO parsing (clip, skip, count), DetectionView (resize, flip, pad), the generated set."""

import copy
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from raysl.data.detection import DetectionView, parse_coco, read_coco, unpad_targets, write_coco
from raysl.data.synthetic_detection import object_pool, render_scene, split_pool, texture, write_detection_set

MAXPIX = 10_000_000


def _coco(annotations: list[dict[str, Any]], **extra: Any) -> bytes:
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 50},
                   {"id": 2, "file_name": "sub/b.png", "width": 40, "height": 40}],
        "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
        "annotations": annotations,
        **extra,
    }
    return json.dumps(doc).encode()


def _ann(image_id: int, cat: int, bbox: list[float], **kw: Any) -> dict[str, Any]:
    return {"image_id": image_id, "category_id": cat, "bbox": bbox, **kw}


def test_parse_maps_categories_and_clips_boxes() -> None:
    records, index = parse_coco(_coco([
        _ann(1, 7, [10, 5, 20, 10]),  # inside
        _ann(1, 3, [-5, -5, 20, 20]),  # top-left outside → [0,0,15,15]
        _ann(1, 7, [90, 40, 30, 30]),  # bottom-right outside → [90,40,100,50]
    ]), "/data/annotations.json")
    assert index.categories == [(3, "dog"), (7, "cat")]  # ascending id order; labels 1..C, 0 = background
    assert index.label_of_category == {3: 1, 7: 2} and index.num_classes == 3
    a, b = records
    np.testing.assert_array_equal(a.boxes, [[10, 5, 30, 15], [0, 0, 15, 15], [90, 40, 100, 50]])
    assert a.boxes.dtype == np.float32 and a.labels.dtype == np.int64
    assert a.labels.tolist() == [2, 1, 2]
    assert b.boxes.shape == (0, 4) and b.labels.shape == (0,)  # an image without boxes is a kept negative
    assert index.counts() == {"images": 2, "boxes": 3, "clipped_boxes": 2, "skipped_degenerate": 0,
                              "skipped_unknown_category": 0, "skipped_no_image": 0, "skipped_crowd": 0,
                              "missing_images": 0}


def test_parse_skips_and_counts_bad_boxes() -> None:
    records, index = parse_coco(_coco([
        _ann(1, 7, [10, 10, 0, 5]),  # zero width
        _ann(1, 7, [10, 10, 5, -3]),  # negative height
        _ann(1, 7, [120, 10, 5, 5]),  # wholly outside: nothing left after clipping
        _ann(1, 99, [10, 10, 5, 5]),  # unknown category
        _ann(42, 7, [10, 10, 5, 5]),  # no such image
        _ann(2, 3, [1, 1, 5, 5], iscrowd=1),
        _ann(2, 3, [1, 2, 3, 4]),
    ]), "x.json")
    c = index.counts()
    assert (c["skipped_degenerate"], c["skipped_unknown_category"], c["skipped_no_image"], c["skipped_crowd"]) \
        == (3, 1, 1, 1)
    assert c["boxes"] == 1 and c["clipped_boxes"] == 0
    assert len(records[0].labels) == 0 and records[1].boxes.tolist() == [[1, 2, 4, 6]]


def test_malformed_json_names_file_and_position() -> None:
    raw = b'{"images": [],\n "annotations": [,]}'
    with pytest.raises(ValueError, match=r"s3://\*\*\*@bucket/ann\.json: malformed JSON at line 2, column 18"):
        parse_coco(raw, "s3://user:secret@bucket/ann.json")


@pytest.mark.parametrize(("raw", "match"), [
    (b'{"images": [], "annotations": []}', r"missing top-level key\(s\) \['categories'\]"),
    (b"[1, 2]", "top level should be a JSON object"),
    (_coco([_ann(1, 7, [1, 2, 3])]), r"annotations\[0\]: bbox should be \[x, y, width, height\]"),
    (_coco([], images=[{"id": 1, "file_name": "a.png", "width": 10}]), r"images\[0\]: missing field 'height'"),
], ids=["missing-key", "not-object", "short-bbox", "no-height"])
def test_structural_faults_are_named(raw: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_coco(raw, "ann.json")


def _png(w: int, h: int, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _batch(images: list[bytes], boxes: list[list[float]], labels: list[list[int]]) -> dict[str, np.ndarray]:
    """A batch shaped as Ray Data hands it over: object arrays of flat float32 / int64 arrays per row."""
    col = np.empty(len(boxes), dtype=object)
    col[:] = [np.asarray(b, np.float32) for b in boxes]
    lab = np.empty(len(labels), dtype=object)
    lab[:] = [np.asarray(x, np.int64) for x in labels]
    return {"image": np.array(images, dtype=object), "key": np.array([f"k{i}" for i in range(len(images))]),
            "image_id": np.arange(len(images), dtype=np.int64) + 10, "boxes": col, "labels": lab}


def test_view_resizes_boxes_and_pads() -> None:
    view = DetectionView(32, MAXPIX, max_boxes=3)
    out = view(_batch([_png(64, 16), _png(20, 20)],
                      [[0, 0, 32, 8, 16, 4, 64, 16], []], [[1, 2], []]))
    assert out["image"].shape == (2, 3, 32, 32) and out["image"].dtype == np.uint8
    assert out["boxes"].shape == (2, 3, 4) and out["boxes"].dtype == np.float32
    np.testing.assert_allclose(out["boxes"][0, :2], [[0, 0, 16, 16], [8, 8, 32, 32]])  # x×0.5, y×2
    assert (out["boxes"][0, 2:] == 0).all() and (out["boxes"][1] == 0).all()
    assert out["labels"].tolist() == [[1, 2, -1], [-1, -1, -1]] and out["labels"].dtype == np.int64
    assert out["num_boxes"].tolist() == [2, 0] and out["dropped_boxes"].tolist() == [0, 0]
    assert out["image_id"].tolist() == [10, 11] and out["valid"].tolist() == [True, True]
    targets = unpad_targets(*(torch.from_numpy(out[k]) for k in ("boxes", "labels", "num_boxes")))
    assert [t["boxes"].shape[0] for t in targets] == [2, 0]


def test_view_flip_mirrors_image_and_boxes() -> None:
    data = _png(16, 16)
    batch = _batch([data], [[2, 3, 6, 9]], [[1]])
    flipped = DetectionView(16, MAXPIX, train=True, flip_p=1.0)(batch)
    plain = DetectionView(16, MAXPIX, train=False, flip_p=1.0)(batch)  # eval: never flips
    np.testing.assert_allclose(flipped["boxes"][0, 0], [16 - 6, 3, 16 - 2, 9])
    np.testing.assert_allclose(plain["boxes"][0, 0], [2, 3, 6, 9])
    np.testing.assert_array_equal(flipped["image"][0], plain["image"][0][:, :, ::-1])


def test_view_flips_vary_across_copies_but_repeat_with_a_seed() -> None:
    import pickle

    batch = _batch([_png(8, 8, i) for i in range(32)], [[1.0, 1, 3, 3]] * 32, [[1]] * 32)

    def flips(view: DetectionView) -> list[bool]:
        return (pickle.loads(pickle.dumps(view))(batch)["boxes"][:, 0, 0] != 1).tolist()  # as Ray ships it

    free = DetectionView(8, MAXPIX, train=True, flip_p=0.5)
    seeded = DetectionView(8, MAXPIX, train=True, flip_p=0.5, seed=1)
    assert flips(free) != flips(free)  # each task draws its own flips (equal by chance: 2**-32)
    assert flips(seeded) == flips(seeded) and 0 < sum(flips(seeded)) < 32


def test_view_drops_tiny_and_surplus_boxes() -> None:
    # 100 px → 10 px: a 5 px wide box becomes 0.5 px and goes; then only max_boxes=2 of the 3 left are kept
    boxes: list[float] = [0, 0, 5, 100, 0, 0, 50, 50, 10, 10, 60, 60, 20, 20, 90, 90]
    out = DetectionView(10, MAXPIX, max_boxes=2)(_batch([_png(100, 100)], [boxes], [[1, 2, 3, 4]]))
    assert out["num_boxes"].tolist() == [2] and out["dropped_boxes"].tolist() == [1]
    assert out["labels"].tolist() == [[2, 3]]


def test_view_marks_undecodable_image_invalid() -> None:
    out = DetectionView(8, MAXPIX)(_batch([b"not an image", _png(8, 8)], [[1, 1, 4, 4], [1, 1, 4, 4]], [[1], [1]]))
    assert out["valid"].tolist() == [False, True]
    assert (out["image"][0] == 0).all() and out["num_boxes"].tolist() == [0, 1]
    assert out["labels"][0].tolist() == [-1] * 50


@pytest.fixture
def crop_folder(tmp_path: Path) -> Path:
    """A folder of class sub-folders of small solid crops, like CIFAR-10's layout."""
    for c, name in enumerate(("ant", "bee")):
        (tmp_path / "objs" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 10), (60 * c + 20 * i, 200, 30)).save(tmp_path / "objs" / name / f"{i}.jpg")
    return tmp_path / "objs"


@pytest.mark.parametrize("kind", ["digits", "folder"])
def test_generated_boxes_are_tight(kind: str, crop_folder: Path) -> None:
    pool = object_pool("digits" if kind == "digits" else str(crop_folder))
    rng = np.random.default_rng(0)
    n_boxes = 0
    for _ in range(20):
        # the scene starts from texture(rng): a copy of the generator redraws the bare background
        bare = texture(copy.deepcopy(rng), 64).astype(np.uint8)
        img, boxes, labels, masks = render_scene(pool, rng, 64, 4)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and len(boxes) == len(labels) == len(masks)
        inside = np.zeros((64, 64), bool)
        for x1, y1, x2, y2 in boxes:
            inside[y1:y2, x1:x2] = True
        assert not (img != bare).any(axis=2)[~inside].any()  # nothing was pasted outside the boxes
        for (x1, y1, x2, y2), mask in zip(boxes, masks, strict=True):
            ys, xs = np.nonzero(mask)
            # every pasted pixel inside the box, and the box touches the object on all four sides
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)
            n_boxes += 1
    assert n_boxes > 10


def test_generated_set_parses_clean_and_is_deterministic(tmp_path: Path) -> None:
    a = write_detection_set(tmp_path / "a", n_images=40, seed=3)
    b = write_detection_set(tmp_path / "b", n_images=40, seed=3)
    c = write_detection_set(tmp_path / "c", n_images=40, seed=4)
    raw = (a / "annotations.json").read_bytes()
    records, index = parse_coco(raw, "a")
    counts = index.counts()
    assert counts["images"] == 40 and counts["boxes"] > 40
    assert sum(v for k, v in counts.items() if k not in ("images", "boxes")) == 0  # nothing clipped or skipped
    assert any(len(r.labels) == 0 for r in records)  # some negatives
    assert [name for _, name in index.categories] == [str(d) for d in range(10)]
    assert raw == (b / "annotations.json").read_bytes() != (c / "annotations.json").read_bytes()
    first = records[0].file_name
    assert (a / first).read_bytes() == (b / first).read_bytes()
    with Image.open(a / first) as im:
        assert im.size == (64, 64)


def test_split_pools_are_disjoint(crop_folder: Path) -> None:
    pool = object_pool(str(crop_folder))
    train, test = split_pool(pool, seed=0, test_fraction=0.34)
    assert len(test.sources) == 2 and not set(train.sources) & set(test.sources)
    assert set(train.sources) | set(test.sources) == set(pool.sources)


def test_read_coco_without_annotations_fails_before_ray(tmp_path: Path) -> None:
    from raysl.storage import StorageError

    with pytest.raises(StorageError, match="cannot read COCO annotations"):
        read_coco(str(tmp_path))


def test_read_coco_streams_rows_through_ray(tmp_path: Path) -> None:
    import ray

    root = write_detection_set(tmp_path / "set", n_images=6, seed=1)
    doc = json.loads((root / "annotations.json").read_text())
    (root / "images" / "000002.png").write_bytes(b"corrupt")  # listed and present, but not an image
    doc["images"].append({"id": 99, "file_name": "images/gone.png", "width": 64, "height": 64})
    write_coco(root, doc["images"], doc["annotations"], doc["categories"])
    expected, _ = parse_coco((root / "annotations.json").read_bytes(), "x")

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds, index = read_coco(str(root))
        assert index.missing_images == 1 and index.images == 6
        assert str(ds.schema().base_schema.field("boxes").type) == "list<item: float>"
        rows = ds.map_batches(DetectionView(32, MAXPIX, max_boxes=8), batch_format="numpy").take_all()
    finally:
        if started:
            ray.shutdown()
    by_id = {int(r["image_id"]): r for r in rows}
    assert sorted(by_id) == [r.image_id for r in expected if r.image_id != 99]
    for rec in expected:
        if rec.image_id == 99:
            continue
        row = by_id[rec.image_id]
        assert row["key"] == rec.file_name and row["valid"] == (rec.file_name != "images/000002.png")
        if row["valid"]:
            k = int(row["num_boxes"])
            np.testing.assert_allclose(row["boxes"][:k], rec.boxes * 0.5)  # 64 px → 32 px
            assert row["labels"][:k].tolist() == rec.labels.tolist()
