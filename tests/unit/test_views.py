"""Decoding: bad inputs are rejected (and counted by the batch transform), odd modes are converted."""

import io

import numpy as np
import pytest
from PIL import Image

from raysl.config import parse_config
from raysl.data.views import BadImage, EvalView, decode_image
from raysl.methods import get_method

MAXPIX = 10_000_000


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _rgb(seed: int = 0, size: int = 40) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return _png(Image.fromarray(arr), "JPEG")


@pytest.mark.parametrize("data", [b"", b"not an image at all", _rgb()[:200]], ids=["zero-byte", "text", "truncated"])
def test_bad_bytes_raise(data: bytes) -> None:
    with pytest.raises(BadImage):
        decode_image(data, MAXPIX)


def test_decompression_bomb_guard() -> None:
    big = _png(Image.new("L", (3000, 3000)))
    with pytest.raises(BadImage, match="max_image_pixels"):
        decode_image(big, 1_000_000)


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "I;16"])
def test_odd_modes_become_rgb(mode: str) -> None:
    img = Image.new(mode, (16, 12))
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    if mode == "I;16":
        img = Image.fromarray(np.arange(16 * 12, dtype=np.uint16).reshape(12, 16) * 300)
    out = decode_image(_png(img, fmt), MAXPIX)
    assert out.mode == "RGB" and out.size == (16, 12)
    if mode == "I;16":  # 16-bit range is rescaled, not clipped to white
        arr = np.asarray(out)
        assert arr.min() == 0 and arr.max() == 255


def _batch(images: list[bytes]) -> dict[str, np.ndarray]:
    return {"image": np.array(images, dtype=object), "key": np.array([f"k{i}" for i in range(len(images))])}


def test_two_views_mark_bad_rows_and_differ() -> None:
    cfg = parse_config({"data": {"uri": "/x"}, "model": {"image_size": 24}})
    transform = get_method("byol").view_transform(cfg)
    out = transform(_batch([_rgb(0), b"garbage", _rgb(1)]))
    assert out["view1"].shape == (3, 3, 24, 24) and out["view1"].dtype == np.uint8
    assert out["valid"].tolist() == [True, False, True]
    assert not out["view1"][1].any()  # the bad row carries zeros, never stale data
    assert not np.array_equal(out["view1"][0], out["view2"][0])  # two different augmentations


def test_eval_view_resizes_and_keeps_labels() -> None:
    batch = _batch([_rgb(0, 50), _rgb(1, 20)])
    batch["label"] = np.array(["cat", "dog"])
    out = EvalView(32, MAXPIX)(batch)
    assert out["image"].shape == (2, 3, 32, 32)
    assert out["label"].tolist() == ["cat", "dog"] and out["valid"].all()
