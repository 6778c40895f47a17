"""Decoding: bad inputs are rejected (and counted by the batch transform), odd modes are converted."""

import io
import weakref
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from raysl.config import parse_config
from raysl.data import views
from raysl.data.views import BadImage, EvalView, TwoViews, crop_draft_side, decode_image
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


def _photo(w: int, h: int, seed: int = 0) -> bytes:
    """A smooth gradient with a little noise, as a JPEG: photo-like, so DCT scaling is judged fairly."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], axis=-1)
    arr = np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
    return _png(Image.fromarray(arr), "JPEG")


def test_draft_decodes_a_large_jpeg_smaller_but_never_below_the_side() -> None:
    data = _photo(2000, 1500)
    assert decode_image(data, MAXPIX).size == (2000, 1500)
    small = decode_image(data, MAXPIX, draft_side=224)
    assert small.mode == "RGB" and small.size == (500, 375)  # 1/4: 1/8 would make the short side 188 < 224
    assert decode_image(data, MAXPIX, draft_side=600).size == (1000, 750)  # 1/2: 1/4 would be 500 < 600
    png = _png(Image.new("RGB", (2000, 1500)))
    assert decode_image(png, MAXPIX, draft_side=224).size == (2000, 1500)  # only JPEG has a draft mode
    with pytest.raises(BadImage, match="max_image_pixels"):  # the bomb guard reads the stored size
        decode_image(data, 1_000_000, draft_side=224)


@pytest.mark.parametrize("min_scale", [0.08, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("aspect", [1.0, 1.5, 3.0])
def test_every_random_resized_crop_of_a_drafted_image_keeps_the_output_resolution(min_scale: float,
                                                                                   aspect: float) -> None:
    size = 64
    side = crop_draft_side(size, min_scale)
    img = torch.zeros(3, side, int(side * aspect))  # the smallest image a draft can return, short side = side
    torch.manual_seed(0)
    for _ in range(2000):
        _, _, h, w = T.RandomResizedCrop.get_params(img, scale=[min_scale, 1.0], ratio=[3 / 4, 4 / 3])
        assert min(h, w) >= size, (h, w, side)
    assert crop_draft_side(224, 0.08) == 915  # BYOL at 224: a 6000×4000 JPEG decodes at 1/4 (1500×1000)


def test_views_keep_one_decoded_image_alive_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    alive: list[weakref.ref[Image.Image]] = []
    most = 0
    real = views.decode_image

    def tracked(*args: Any, **kwargs: Any) -> Image.Image:
        nonlocal most
        most = max(most, sum(r() is not None for r in alive))  # decoded earlier and still referenced
        img = real(*args, **kwargs)
        alive.append(weakref.ref(img))
        return img

    monkeypatch.setattr(views, "decode_image", tracked)
    transform = TwoViews(24, MAXPIX, crop_scale=(0.2, 1.0), flip_p=0.5, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8,
                         gray_p=0.2, blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2))
    out = transform(_batch([_rgb(i, 60) for i in range(8)]))
    assert out["valid"].all() and len(alive) == 8
    assert most == 0  # each image was released before the next one was decoded


def test_eval_view_of_a_drafted_jpeg_matches_the_full_decode() -> None:
    data = _photo(1600, 1200, seed=1)
    batch = _batch([data, b"", data])
    batch["caption"] = np.array(["x", "y", "z"], dtype=object)
    out = EvalView(96, MAXPIX)(batch)
    assert out["valid"].tolist() == [True, False, True] and out["caption"].tolist() == ["x", "y", "z"]
    full = decode_image(data, MAXPIX).resize((96, 96), Image.Resampling.BICUBIC)
    diff = np.abs(out["image"][0].astype(np.int16) - np.asarray(full).transpose(2, 0, 1).astype(np.int16))
    assert diff.mean() < 2.0, diff.mean()  # the 1/8 DCT decode then bicubic ≈ full decode then bicubic
