"""DINO's multi-crop transform (raysl/data/multicrop.py, views.CropViews): crops of their own sizes from JPEG bytes
and from clips of decoded video frames (one sample per frame; a clip that failed gives invalid rows)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from raysl.config import parse_config
from raysl.config_ssl import DINOConfig
from raysl.data.frames import FrameRows
from raysl.data.multicrop import MultiCrop, crop_columns, multi_crop_specs
from raysl.data.views import crop_draft_side
from raysl.methods import get_method
from raysl.methods.base import BatchFn

CROPS = ("global0", "global1", "local0", "local1", "local2")


def jpeg(seed: int, side: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def transform(local_crops: int = 3) -> BatchFn:
    cfg = parse_config({"data": {"uri": "x"}, "model": {"backbone": "vit_tiny_patch16_224", "image_size": 32,
                                                        "patch_size": 8},
                        "method": {"name": "dino", "local_crops": local_crops}})
    return get_method("dino").view_transform(cfg)


def check_crops(out: dict[str, np.ndarray], n: int) -> None:
    assert set(out) >= {*CROPS, "valid", "key"}
    for c in CROPS:
        side = 32 if c.startswith("global") else 16
        assert out[c].shape == (n, 3, side, side) and out[c].dtype == np.uint8, c
    assert out["valid"].dtype == bool and out["valid"].shape == (n,)


def test_crops_of_jpeg_bytes_at_their_own_sizes() -> None:
    batch = {"image": np.array([jpeg(0), b"garbage", jpeg(1)], dtype=object), "key": np.array(["a", "b", "c"]),
             "label": np.array(["x", "y", "z"])}
    out = transform()(batch)
    check_crops(out, 3)
    assert out["valid"].tolist() == [True, False, True]
    assert out["key"].tolist() == ["a", "b", "c"] and out["label"].tolist() == ["x", "y", "z"]
    assert all(not out[c][1].any() for c in CROPS)  # the bad row is zeros, never stale data
    assert all(out[c][0].any() for c in CROPS)
    assert not np.array_equal(out["global0"][0], out["global1"][0])


def test_every_frame_of_a_clip_is_a_sample_and_failed_clips_are_invalid() -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 4, 40, 48, 3), dtype=np.uint8)  # 3 clips of 4 frames, one array
    frames[1] = 0  # what a failed clip carries
    batch = {"frames": frames, "ok": np.array([True, False, True]), "key": np.array(["v#0", "v#60", "w#0"])}
    out = transform()(batch)
    check_crops(out, 12)
    assert out["valid"].tolist() == [True] * 4 + [False] * 4 + [True] * 4
    assert out["key"][:5].tolist() == ["v#0/0", "v#0/1", "v#0/2", "v#0/3", "v#60/0"]
    assert all(not out[c][4:8].any() for c in CROPS)
    assert all(out["global0"][i].any() for i in (0, 3, 8, 11))


def test_clips_of_any_size_and_a_clip_without_frames() -> None:
    rng = np.random.default_rng(1)
    frames = np.empty(3, dtype=object)  # rows of different shapes come as objects
    frames[0] = rng.integers(0, 256, (2, 30, 40, 3), dtype=np.uint8)
    frames[1] = np.zeros((0,), dtype=np.uint8)  # nothing decoded: still counted, as one invalid row
    frames[2] = rng.integers(0, 256, (3, 64, 36, 3), dtype=np.uint8)
    batch = {"frames": frames, "ok": np.array([True, False, True]), "key": np.array(["a", "b", "c"]),
             "label": np.array(["p", "q", "r"])}
    out = transform(local_crops=3)(batch)
    check_crops(out, 6)
    assert out["valid"].tolist() == [True, True, False, True, True, True]
    assert out["key"].tolist() == ["a/0", "a/1", "b/0", "c/0", "c/1", "c/2"]
    assert out["label"].tolist() == ["p", "p", "q", "r", "r", "r"]


def test_a_malformed_frame_is_invalid_not_a_crash() -> None:
    frames = np.empty(1, dtype=object)
    frames[0] = np.zeros((2, 8, 8, 3), dtype=np.float32)  # not uint8
    rows = FrameRows({"frames": frames, "ok": np.array([True]), "key": np.array(["k"])})
    assert len(rows) == 2 and rows.image(0) is None


def test_specs_and_draft_follow_each_crop() -> None:
    c = DINOConfig(local_crops=2)
    specs = multi_crop_specs(224, 96, c)
    assert tuple(specs) == crop_columns(2) == ("global0", "global1", "local0", "local1")
    assert [s.blur_p for s in specs.values()] == [1.0, 0.1, 0.5, 0.5]
    assert [s.solarize_p for s in specs.values()] == [0.0, 0.2, 0.0, 0.0]
    assert [s.size for s in specs.values()] == [224, 224, 96, 96]
    assert specs["global0"].scale == (0.4, 1.0) and specs["local0"].scale == (0.05, 0.4)
    assert all(s.flip_p == 0.5 and s.jitter_p == 0.8 and s.gray_p == 0.2 for s in specs.values())
    views = MultiCrop(224, 96, 10_000_000, c)
    # the local crops (96 px of 5%) need more source pixels than the global ones (224 px of 40%)
    assert views.draft_side == crop_draft_side(96, 0.05) > crop_draft_side(224, 0.4)
    assert MultiCrop(224, 96, 10_000_000, DINOConfig(local_crops=0)).draft_side == crop_draft_side(224, 0.4)


@pytest.mark.parametrize("local_crops", [0, 1])
def test_column_count_follows_the_config(local_crops: int) -> None:
    out = transform(local_crops)({"image": np.array([jpeg(2)], dtype=object), "key": np.array(["k"])})
    assert [k for k in out if k.startswith(("global", "local"))] == list(crop_columns(local_crops))
