"""DoRA's method class: what gets gradients, the loss it computes from the teacher's masks, and the settings it
refuses (raysl/methods/dora.py; the tracker itself is tested in test_dora_track.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raysl.config import parse_config
from raysl.data.sources import Listing
from raysl.methods import get_method
from raysl.methods.dora import DoRA, cross_entropy
from raysl.storage import S3Settings

TINY: dict[str, Any] = {
    "data": {"uri": "/unused", "frames_per_clip": 3},
    "model": {"backbone": "vit_tiny_patch16_224", "image_size": 32, "patch_size": 8,
              "backbone_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 3, "drop_path_rate": 0.0}},
    "method": {"name": "dora", "out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "local_crops": 2,
               "local_size": 16},
    "train": {"steps": 20},
}


def tiny(**method: Any) -> DoRA:
    torch.manual_seed(0)
    cfg = parse_config({**TINY, "method": {**TINY["method"], **method}})
    model = get_method("dora").build(cfg)
    assert isinstance(model, DoRA)
    return model


def clips(b: int = 2, t: int = 3, local: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"clip": torch.randint(0, 256, (b, t, 3, 32, 32), generator=g, dtype=torch.uint8),
            "locals": torch.randint(0, 256, (b, t, local, 3, 16, 16), generator=g, dtype=torch.uint8)}


def test_only_the_student_learns_and_prototypes_freeze_first() -> None:
    torch.set_num_threads(1)
    model = tiny(freeze_last_layer_steps=1)
    model.collate(clips(), 1, 0)
    out = model.forward_backward(model, clips())
    assert torch.isfinite(out["loss"]) and 0 < float(out["mask_fraction"]) <= 1
    named = dict(model.named_parameters())
    assert all(p.grad is None for n, p in named.items() if n.startswith("teacher"))
    assert all(p.grad is None for n, p in named.items() if n.startswith("head.last_layer"))  # frozen at step 1
    assert all(p.grad is not None for n, p in named.items()
               if p.requires_grad and n.startswith(("backbone.blocks", "head.mlp")))
    before = {n: p.detach().clone() for n, p in named.items() if n.startswith("teacher")}
    model.zero_grad()
    model.collate(clips(), 2, 0)  # past the freeze: the prototypes get gradients too
    model.forward_backward(model, clips())
    assert any(p.grad is not None for n, p in named.items() if n.startswith("head.last_layer"))
    assert all(torch.equal(before[n], p) for n, p in named.items() if n.startswith("teacher"))


def test_loss_is_half_masked_views_half_local_crops_against_the_unmasked_teacher() -> None:
    model = tiny()
    batch = clips()
    model.collate(batch, 1, 0)
    center = model.loss_fn.center.clone()
    torch.manual_seed(5)
    out = model(batch)
    # the same pieces by hand, from the teacher's logits and masks (the heads drawn per step are reproducible)
    x = (batch["clip"].flatten(0, 1).float() / 255 - torch.tensor(model.mean).view(1, 3, 1, 1)) \
        / torch.tensor(model.std).view(1, 3, 1, 1)
    teacher, masks = model.teacher_masks(x, 2)
    target = F.softmax((teacher - center) / model.temperature(), dim=-1)
    masked = (x.view(2, 3, 1, 3, 32, 32) * masks).flatten(0, 2)
    with torch.no_grad():
        s_masked = model.head(model.backbone(masked)).view(6, masks.shape[2], -1)
        loc = (batch["locals"].flatten(0, 2).float() / 255 - torch.tensor(model.mean).view(1, 3, 1, 1)) \
            / torch.tensor(model.std).view(1, 3, 1, 1)
        s_local = model.head(model.backbone(loc)).view(6, 2, -1)
    ce = lambda s: float(-(target[:, None] * F.log_softmax(s / 0.1, -1)).sum(-1).mean())  # noqa: E731
    expected = 0.5 * (ce(s_masked) + ce(s_local))
    assert float(out["loss"].detach()) == pytest.approx(expected, rel=1e-4)
    # the centre moved towards the mean teacher output, after the loss
    assert torch.allclose(model.loss_fn.center, 0.9 * center + 0.1 * teacher.mean(0, keepdim=True), atol=1e-6)


def test_masks_keep_one_object_each_and_never_overlap() -> None:
    model = tiny(objects=3)
    x = torch.randn(6, 3, 32, 32)
    _, masks = model.teacher_masks(x, 2)
    assert masks.shape == (2, 3, 3, 1, 32, 32)
    assert float(masks.sum(dim=2).max()) <= 1  # a pixel belongs to one object at most
    assert bool((masks.flatten(3).sum(-1) > 0).all())  # no object is empty in any frame


def test_cross_entropy_of_a_uniform_student_is_log_k() -> None:
    target = F.softmax(torch.randn(4, 10), dim=-1)
    assert float(cross_entropy(target, torch.zeros(4, 3, 10), 0.1)) == pytest.approx(np.log(10), rel=1e-6)


@pytest.mark.parametrize(("change", "field"), [
    ({"model": {"backbone": "resnet18", "image_size": 32}}, "model.backbone"),
    ({"method": {**TINY["method"], "objects": 4}}, "method.objects"),
])
def test_settings_dora_cannot_honour_are_named(change: dict[str, Any], field: str) -> None:
    cfg = parse_config({**TINY, **change})
    with pytest.raises(ValueError, match=field):
        get_method("dora").build(cfg)


def test_still_images_are_refused_with_the_fix() -> None:
    cfg = parse_config(TINY)
    images = Listing("/data/photos", "images", ("/data/photos/a.jpg",))
    with pytest.raises(ValueError, match="learns from video.*clip shards"):
        get_method("dora").check_source(cfg, S3Settings.resolve(), images)
