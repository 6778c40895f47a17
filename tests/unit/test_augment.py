"""Batched augmentations against torchvision's per-image PIL pipeline they replace, and the CPU path against the
device path: the same distribution of crops, flips and colours (within tolerances measured over thousands of
draws), valid shapes, dtypes and ranges."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from raysl.data.augment import DeviceViews, ViewSpec, augment, gaussian_blur, sample_crops
from raysl.data.views import CropViews, decode_image, two_view_specs

BYOL = {"crop_scale": (0.08, 1.0), "flip_p": 0.5, "jitter": (0.4, 0.4, 0.2, 0.1), "jitter_p": 0.8, "gray_p": 0.2,
        "blur_p": (1.0, 0.1), "solarize_p": (0.0, 0.2)}


def reference_pipeline(spec: ViewSpec) -> T.Compose:
    """torchvision per image, on PIL: what the batched views replace."""
    b, c, s, h = spec.jitter
    return T.Compose([
        T.RandomResizedCrop(spec.size, scale=spec.scale, antialias=True), T.RandomHorizontalFlip(spec.flip_p),
        T.RandomApply([T.ColorJitter(b, c, s, h)], p=spec.jitter_p), T.RandomGrayscale(spec.gray_p),
        T.RandomApply([T.GaussianBlur(spec.blur_kernel, sigma=(0.1, 2.0))], p=spec.blur_p),
        T.RandomSolarize(128, p=spec.solarize_p), T.PILToTensor()])


def photo(seed: int, w: int = 96, h: int = 72) -> Image.Image:
    """A smooth colourful image with a left/right asymmetry (flips show in the mean of the left half)."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(low).astype(np.float32)
    arr[:, : w // 3] = arr[:, : w // 3] * 0.3  # dark left third
    return Image.fromarray(arr.astype(np.uint8))


def jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_crops_match_torchvision_distribution_and_stay_in_bounds() -> None:
    rng = np.random.default_rng(0)
    n, (w, h) = 20000, (500, 375)
    boxes = sample_crops(np.full(n, w), np.full(n, h), (0.08, 1.0), (3 / 4, 4 / 3), rng)
    x0, y0, cw, ch = boxes.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (cw > 0).all() and (ch > 0).all()
    assert (x0 + cw <= w).all() and (y0 + ch <= h).all()
    torch.manual_seed(0)
    ref = np.array([T.RandomResizedCrop.get_params(torch.empty(1, h, w), [0.08, 1.0], [3 / 4, 4 / 3])
                    for _ in range(4000)])  # (i, j, h, w)
    area, ref_area = cw * ch / (w * h), ref[:, 2] * ref[:, 3] / (w * h)
    assert abs(area.mean() - ref_area.mean()) < 0.02
    assert abs(np.log(cw / ch).mean() - np.log(ref[:, 3] / ref[:, 2]).mean()) < 0.03
    assert abs((x0 + cw / 2).mean() / w - (ref[:, 1] + ref[:, 3] / 2).mean() / w) < 0.02


def test_crop_fallback_is_centred_and_within_ratio() -> None:
    # a 1000×10 strip: no crop of aspect 3/4…4/3 with area ≥ 50% fits, so the fallback is used
    boxes = sample_crops(np.array([1000]), np.array([10]), (0.5, 1.0), (3 / 4, 4 / 3), np.random.default_rng(0))
    x0, y0, cw, ch = boxes[0]
    assert (ch, cw) == (10, 13) and y0 == 0 and x0 == (1000 - 13) // 2


def _views(batch_fn: CropViews | DeviceViews, images: list[Image.Image], repeats: int) -> dict[str, np.ndarray]:
    data = np.array([jpeg(im) for im in images] * repeats, dtype=object)
    keys = np.array([str(i) for i in range(len(data))])
    if isinstance(batch_fn, DeviceViews):
        decoded = CropViews(10**8, batch_fn.specs, on="gpu", decode_side=128)({"image": data, "key": keys})
        out = batch_fn({"decoded": torch.from_numpy(decoded["decoded"]),
                        "decoded_hw": torch.from_numpy(decoded["decoded_hw"])})
        return {k: v.numpy() for k, v in out.items()}
    return batch_fn({"image": data, "key": keys})


def _stats(v: np.ndarray) -> dict[str, float]:
    x = v.astype(np.float64) / 255
    w = x.shape[-1]
    return {"mean": x.mean(), "std": x.std(axis=(1, 2, 3)).mean(),
            "sat": (x.max(axis=1) - x.min(axis=1)).mean(),  # colourfulness: 0 for gray images
            "gray_frac": float((np.abs(x[:, 0] - x[:, 1]).max(axis=(1, 2)) < 2 / 255).mean()),
            "left_dark": float((x[..., : w // 2].mean(axis=(1, 2, 3)) < x[..., w // 2:].mean(axis=(1, 2, 3))).mean()),
            "sharp": np.abs(np.diff(x, axis=-1)).mean(),
            "mean_spread": x.mean(axis=(1, 2, 3)).std(),  # brightness and contrast jitter widen these
            "std_spread": x.std(axis=(1, 2, 3)).std(),
            "hue_spread": (x[:, 0] - x[:, 2]).mean(axis=(1, 2)).std()}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread, as in a Ray Data task: torchvision's blur on tiny images crawls across threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("view", ["view1", "view2"])
def test_batched_cpu_and_device_views_match_the_pil_reference(view: str) -> None:
    images = [photo(s) for s in range(40)]
    specs = two_view_specs(32, **BYOL)
    torch.manual_seed(0)
    ref_pipe = reference_pipeline(specs[view])
    ref = np.stack([ref_pipe(jpeg_im).numpy() for jpeg_im in
                    [decode_image(jpeg(im), 10**8) for im in images] * 50])
    cpu = _views(CropViews(10**8, specs), images, 50)[view]
    dev = _views(DeviceViews(specs, seed=0), images, 50)[view]
    assert cpu.dtype == dev.dtype == np.uint8 and cpu.shape == dev.shape == ref.shape == (2000, 3, 32, 32)
    r, c, d = _stats(ref), _stats(cpu), _stats(dev)
    # Measured: dropping jitter moves mean_spread by 0.03 and std_spread by 0.027, gray sat by 0.05 and gray_frac
    # by 0.19, flips left_dark by 0.33, blur sharp by 0.0034, crop scale 0.5–1 sharp by 0.008; the batched paths
    # sit within a third of each tolerance of the reference
    tol = {"mean": 0.015, "std": 0.015, "sat": 0.02, "gray_frac": 0.04, "left_dark": 0.05, "sharp": 0.002,
           "mean_spread": 0.01, "std_spread": 0.008, "hue_spread": 0.008}
    for key, t in tol.items():
        assert abs(c[key] - r[key]) < t, (view, key, c[key], r[key])
        assert abs(d[key] - r[key]) < t, (view, key, d[key], r[key])


def test_flip_and_gray_and_solarize_rates_follow_their_probabilities() -> None:
    rng = np.random.default_rng(1)
    n = 4000
    x = torch.zeros(n, 3, 4, 4)
    x[..., 2:] = 0.8  # right half bright, coloured
    x[:, 0] *= 0.5
    spec = ViewSpec(4, (1.0, 1.0), flip_p=0.5, gray_p=0.2, solarize_p=0.3)
    out = augment(x.clone(), spec, rng)
    flipped = out[:, 1, 0, 0] > out[:, 1, 0, 3]
    assert abs(float(flipped.float().mean()) - 0.5) < 0.03
    gray = (out[:, 0] == out[:, 1]).all(dim=(1, 2))
    assert abs(float(gray.float().mean()) - 0.2) < 0.03
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_jitter_factors_stay_in_their_ranges() -> None:
    """Brightness alone: each image is scaled by one factor in [0.6, 1.4] (clamped at 1)."""
    x = torch.full((2000, 3, 2, 2), 0.5)
    out = augment(x.clone(), ViewSpec(2, (1.0, 1.0), jitter=(0.4, 0, 0, 0), jitter_p=0.8), np.random.default_rng(2))
    f = out[:, 0, 0, 0] / 0.5
    assert float(f.min()) >= 0.6 - 1e-5 and float(f.max()) <= 1.4 + 1e-5
    assert abs(float((f != 1).float().mean()) - 0.8) < 0.03
    assert torch.allclose(out, f.view(-1, 1, 1, 1) * 0.5)  # the same factor over the whole image


def test_per_image_blur_matches_torchvision() -> None:
    x = torch.rand(3, 3, 20, 20)
    sigma = torch.tensor([0.3, 1.0, 2.0])
    out = gaussian_blur(x, 5, sigma)
    for i, s in enumerate(sigma.tolist()):
        ref = T.functional.gaussian_blur(x[i:i + 1], [5, 5], [s, s])
        assert torch.allclose(out[i:i + 1], ref, atol=1e-5)


def test_hue_matches_torchvision_adjust_hue_including_gray_and_tied_pixels() -> None:
    from raysl.data.augment import _hue

    x = torch.rand(6, 3, 24, 24)
    x[0] = 0.5  # gray: no hue, unchanged
    x[1, 1] = x[1, 0]  # red and green tied: torchvision takes the red sector
    x[2] = (x[2] * 255).round() / 255  # quantised, as decoded images are: many ties
    x[3, 2] = x[3].amax(dim=0)  # blue is the max everywhere
    factors = [0.0, 0.1, -0.1, 0.05, -0.5, 0.5]
    out = _hue(x.clone(), torch.tensor(factors).view(-1, 1, 1, 1))
    for i, f in enumerate(factors):
        assert torch.allclose(out[i], T.functional.adjust_hue(x[i], f), atol=1e-5), i
    assert torch.equal(out[0], x[0])


def test_bad_images_are_zero_and_invalid_in_both_paths() -> None:
    specs = two_view_specs(16, **BYOL)
    batch = {"image": np.array([jpeg(photo(0)), b"not an image", b""], dtype=object), "key": np.array(["a", "b", "c"])}
    for on in ("cpu", "gpu"):
        out = CropViews(10**8, specs, on=on)(batch)
        assert out["valid"].tolist() == [True, False, False]
        for name in (["decoded"] if on == "gpu" else ["view1", "view2"]):
            assert out[name][1:].max() == 0 and out[name][0].max() > 0
    out = CropViews(10**8, specs, on="gpu", decode_side=40)(batch)
    assert out["decoded"].shape == (3, 3, 40, 40) and out["decoded_hw"][0].tolist() == [96, 72]


def test_reduced_size_decode_matches_full_decode_then_resize() -> None:
    """A JPEG drafted (DCT-scaled) to ≥ 2× the output, then resized, is the full decode resized, within a small
    error: what EvalView and the crops rely on."""
    big = photo(3, w=1600, h=1200)
    data = jpeg(big, quality=95)
    full = decode_image(data, 10**8).resize((224, 224), Image.Resampling.BILINEAR)
    drafted_img = decode_image(data, 10**8, draft_side=448)
    assert drafted_img.size[0] < 1600  # DCT scaling did happen
    drafted = drafted_img.resize((224, 224), Image.Resampling.BILINEAR)
    diff = np.abs(np.asarray(full, dtype=np.float64) - np.asarray(drafted, dtype=np.float64))
    assert diff.mean() < 1.5 and math.isfinite(diff.max())


BYOL_TINY = {"projector_hidden": 64, "predictor_hidden": 64, "projector_dim": 32}
IJEPA_TINY = {"predictor_depth": 1, "predictor_width": 48, "predictor_heads": 3}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("method", ["byol", "ijepa"])
def test_augment_on_gpu_trains_through_device_augment(method: str) -> None:
    """augment_on=gpu end to end on the CPU device: Ray Data's transform only decodes; the method's
    device_augment makes the views it trains on (the same columns and shapes as the CPU path)."""
    from raysl.config import parse_config
    from raysl.methods import get_method
    from raysl.train.local import pretrain_in_process

    tree = {"data": {"uri": "x", "augment_on": "gpu", "gpu_decode_size": 48},
            "model": {"backbone": "resnet18" if method == "byol" else "vit_tiny_patch16_224", "image_size": 32,
                      **({"patch_size": 8} if method == "ijepa" else {})},
            "method": {"name": method, **(BYOL_TINY if method == "byol" else IJEPA_TINY)},
            "train": {"steps": 2, "batch_size": 8}}
    cfg = parse_config(tree)
    cls = get_method(method)
    images = np.array([jpeg(photo(s)) for s in range(16)], dtype=object)
    raw = cls.view_transform(cfg)({"image": images[:4], "key": np.array(list("abcd"))})
    assert set(raw) >= {"decoded", "decoded_hw"} and raw["decoded"].shape == (4, 3, 48, 48)
    m = cls.build(cfg)
    views = m.device_augment({"decoded": torch.from_numpy(raw["decoded"]),
                              "decoded_hw": torch.from_numpy(raw["decoded_hw"])})
    assert set(views) == set(cls.batch_columns) and all(v.shape == (4, 3, 32, 32) for v in views.values())
    _, losses = pretrain_in_process(cfg, images)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_augment_on_gpu_is_refused_by_a_method_without_device_views() -> None:
    from raysl.config import parse_config
    from raysl.methods import get_method

    cfg = parse_config({"data": {"uri": "x", "augment_on": "gpu"}, "method": {"name": "byol"}})
    get_method("byol").check_config(cfg)  # supported
    cfg = cfg.model_copy(update={"method": cfg.method.model_copy(update={"name": "classify"})})
    with pytest.raises(ValueError, match=r"data.augment_on: 'gpu' is not supported by method 'classify'.*'cpu'"):
        get_method("classify").check_config(cfg)
