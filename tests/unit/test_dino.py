"""DINO as a method (raysl/methods/dino.py): gradients and the teacher, schedules by step, centering, the loss's
pairs, per-parameter clipping and a few real optimisation steps, on a tiny ViT (32 px, patch 8) and K = 256."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from raysl.config import PretrainConfig, parse_config
from raysl.data.views import normalize
from raysl.methods import get_method
from raysl.methods.dino import DINO, local_size
from raysl.methods.dino_parts import cosine

K = 256
TINY = {"out_dim": K, "hidden_dim": 64, "bottleneck_dim": 32, "local_crops": 2}


def config(method: dict[str, Any] | None = None, **sections: Any) -> PretrainConfig:
    tree: dict[str, Any] = {"data": {"uri": "x"},
                            "model": {"backbone": "vit_tiny_patch16_224", "image_size": 32, "patch_size": 8,
                                      "backbone_kwargs": {"depth": 2}},
                            "method": {"name": "dino", **TINY, **(method or {})},
                            "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.04, "weight_decay_end": 0.4},
                            "train": {"steps": 100, "batch_size": 4}}
    for name, values in sections.items():
        tree[name] = {**tree.get(name, {}), **values}
    return parse_config(tree)


def build(method: dict[str, Any] | None = None, **sections: Any) -> DINO:
    torch.manual_seed(0)
    m = get_method("dino").build(config(method, **sections))
    assert isinstance(m, DINO)
    return m


def batch(m: DINO, n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    side = {c: 32 if c.startswith("global") else 16 for c in m.columns}
    return {c: torch.randint(0, 256, (n, 3, side[c], side[c]), generator=g, dtype=torch.uint8) for c in m.columns}


def jpeg(seed: int, side: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


class Const(nn.Module):
    """A head whose output is `g` for every sample."""

    def __init__(self, g: torch.Tensor) -> None:
        super().__init__()
        self.g = g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g.expand(len(x), -1)


def capture(module: nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    module.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    return seen


def test_teacher_moves_only_by_ema_and_the_student_learns_all_but_the_frozen_prototypes() -> None:
    m = build({"freeze_last_layer_steps": 2, "norm_last_layer": True})
    assert m.encoder() is m.teacher_backbone
    assert all(not p.requires_grad for p in (*m.teacher_backbone.parameters(), *m.teacher_head.parameters()))
    opt = torch.optim.AdamW(m.student_parameters(), lr=1e-2)
    teacher0 = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("teacher_")}
    gain = m.head.last_layer.parametrizations.weight.original0
    last = {id(p) for p in m.head.last_layer_parameters()}
    for step in (1, 3):  # in the freeze window (2 steps), then after it
        opt.zero_grad(set_to_none=True)
        m.forward_backward(m, m.collate(batch(m, seed=step), step, 0))
        assert all(p.grad is None for p in (*m.teacher_backbone.parameters(), *m.teacher_head.parameters()))
        assert gain.grad is None  # norm_last_layer: unit prototypes, the gain never trains
        for name, p in (*m.backbone.named_parameters(), *m.head.named_parameters()):
            if id(p) in last:
                assert (p.grad is None) == (step == 1 or p is gain), name
            else:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
        now = {k: v for k, v in m.state_dict().items() if k.startswith("teacher_")}
        assert all(torch.equal(now[k], teacher0[k]) for k in teacher0)  # optimizer steps never touch it
    student = dict(m.head.named_parameters())
    metrics = m.on_step_end(3, 100)
    mom = cosine(2, 100, 0.996, 1.0)
    assert metrics["teacher_momentum"] == pytest.approx(mom)
    for name, p in m.teacher_head.named_parameters():
        expected = mom * teacher0[f"teacher_head.{name}"] + (1 - mom) * student[name].detach()
        assert torch.allclose(p, expected, atol=1e-7), name


def test_a_trainable_gain_learns_after_the_freeze() -> None:
    m = build({"freeze_last_layer_steps": 1, "norm_last_layer": False})
    m.forward_backward(m, m.collate(batch(m), 2, 0))
    assert all(p.grad is not None for p in m.head.last_layer_parameters())


def test_schedules_by_step_with_the_papers_shares_by_default() -> None:
    m = build({"teacher_temp": (0.04, 0.07)}, train={"steps": 100})
    assert (m.temp_warmup, m.freeze_steps) == (10, 1)  # 10% and 1% of train.steps
    for step, temp in [(1, 0.04), (6, 0.055), (11, 0.07), (80, 0.07)]:
        m.collate({}, step, 0)
        assert m.temperature() == pytest.approx(temp)
    out = m(batch(m))
    assert out["teacher_temp"].item() == pytest.approx(0.07)
    assert m.teacher_momentum(1, 100) == pytest.approx(0.996)  # the first update: main_dino.py's schedule[0]
    assert m.teacher_momentum(51, 100) == pytest.approx(0.998)
    assert 0.999999 < m.teacher_momentum(100, 100) < 1.0  # approached, not reached, at the last step
    set_ = build({"teacher_temp_warmup_steps": 4, "freeze_last_layer_steps": 0})
    assert (set_.temp_warmup, set_.freeze_steps) == (4, 0)


def test_loss_is_the_sum_over_cross_view_pairs_and_the_centre_an_ema() -> None:
    m = build()
    m.eval()  # no drop-path: the student's outputs equal the teacher's at initialisation
    student, teacher, seen = capture(m.head), capture(m.teacher_head), []
    m.teacher_backbone.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    center = torch.randn(1, K)
    m.loss_fn.center.copy_(center)
    b = batch(m)
    out = m(b)
    assert torch.equal(seen[0], normalize(torch.cat([b["global0"], b["global1"]]), m.mean, m.std))  # globals only
    views = student[0].chunk(4)  # global0, global1, local0, local1
    assert all(torch.allclose(views[i], teacher[0].chunk(2)[i], atol=1e-5) for i in (0, 1))
    targets = [torch.softmax((t - center) / 0.04, dim=-1) for t in teacher[0].chunk(2)]

    def pair(a: int, v: int) -> torch.Tensor:
        return -(targets[a] * torch.log_softmax(views[v] / 0.1, dim=-1)).sum(-1).mean()

    cross = sum(pair(a, v) for a in range(2) for v in range(4) if v != a) / 6
    every = sum(pair(a, v) for a in range(2) for v in range(4)) / 8
    assert torch.allclose(out["loss"], cross, atol=1e-5)
    assert not torch.allclose(out["loss"], every, atol=1e-3)
    assert torch.allclose(m.loss_fn.center, 0.9 * center + 0.1 * teacher[0].mean(0, keepdim=True), atol=1e-6)
    assert out["teacher_entropy"].item() < out["student_entropy"].item() <= math.log(K)  # sharpened teacher


def test_constant_teacher_output_is_centred_away_and_a_collapsed_output_costs_log_k() -> None:
    m = build()
    g = torch.randn(1, K) * 5
    m.teacher_head = Const(g)
    entropies = []
    for n in range(1, 6):
        entropies.append(m(batch(m))["teacher_entropy"].item())
        assert torch.allclose(m.loss_fn.center, (1 - 0.9**n) * g, atol=1e-5)
    assert entropies == sorted(entropies)  # centering alone drifts the teacher towards uniform
    m.head = Const(torch.zeros(1, K))
    m.teacher_head = Const(torch.zeros(1, K))
    assert m(batch(m))["loss"].item() == pytest.approx(math.log(K), rel=1e-6)


def test_each_gradient_is_clipped_on_its_own() -> None:
    def grads(clip: float | None) -> dict[str, torch.Tensor]:
        m = build({"clip_grad": clip, "freeze_last_layer_steps": 0})
        scaled = lambda b: {k: v * 1e3 if k == "loss" else v for k, v in m(b).items()}  # noqa: E731
        torch.manual_seed(1)  # the same drop-path draws in both runs
        m.forward_backward(scaled, m.collate(batch(m), 5, 0))  # type: ignore[arg-type]
        return {n: p.grad.clone() for n, p in (*m.backbone.named_parameters(), *m.head.named_parameters())
                if p.grad is not None}

    free = grads(None)
    norms = sorted(g.norm().item() for g in free.values())
    mid = len(norms) // 2
    bound = math.sqrt(norms[mid - 1] * norms[mid])  # half the tensors above it, half below, none on it
    clipped = grads(bound)
    for name, g in free.items():
        if g.norm() > bound:
            assert clipped[name].norm().item() == pytest.approx(bound, rel=1e-4), name
            assert torch.allclose(clipped[name], g * bound / g.norm(), rtol=1e-4, atol=1e-12), name
        else:
            assert torch.equal(clipped[name], g), name  # untouched, not rescaled by a global norm


def test_local_crop_size_and_refused_settings() -> None:
    assert local_size(config()) == 16  # 32·96/224 = 13.7 → two 8-px patches
    assert local_size(config(model={"image_size": 224, "patch_size": None})) == 96
    assert local_size(config(model={"backbone": "resnet18", "patch_size": None})) == 14
    assert local_size(config(model={"image_size": 8})) == 8  # at least one patch
    cls = get_method("dino")
    with pytest.raises(ValueError, match=r"data.augment_on: 'gpu' is not supported by method 'dino'.*'cpu'"):
        cls.check_config(config(data={"augment_on": "gpu"}))
    with pytest.raises(ValueError, match=r"method.local_size: 48 is larger than model.image_size 32"):
        cls.build(config({"local_size": 48}))
    with pytest.raises(ValueError, match=r"method.local_size: 12 is not a multiple of the patch size 8"):
        cls.check_config(config({"local_size": 12}))
    with pytest.raises(ValueError, match=r"method.momentum"):
        cls.check_config(config({"momentum": (0.999, 0.99)}))
    cls.check_config(config({"local_size": 48, "local_crops": 0}))  # no local crops: their size does not matter


def test_teacher_drops_no_paths_while_the_student_does() -> None:
    m = build()
    rates = [getattr(mod, "drop_prob", None) for mod in m.backbone.modules()]
    assert max(r for r in rates if r is not None) == pytest.approx(0.1)
    assert all(getattr(mod, "drop_prob", 0.0) == 0.0 for mod in m.teacher_backbone.modules())


@pytest.mark.parametrize("model", [{}, {"backbone": "resnet18", "cifar_stem": True, "patch_size": None,
                                                "backbone_kwargs": {}}],
                         ids=["vit", "resnet-cifar"])
def test_real_steps_through_the_views_keep_the_loss_finite(model: dict[str, Any]) -> None:
    from raysl.train.local import pretrain_in_process

    torch.set_num_threads(1)
    cfg = config(model=model, train={"steps": 2, "batch_size": 4})
    images = np.array([jpeg(s) for s in range(8)], dtype=object)
    method, losses = pretrain_in_process(cfg, images)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert isinstance(method, DINO) and method.steps_done == 2
    assert not torch.equal(method.teacher_head.mlp[0].weight, method.head.mlp[0].weight)  # an EMA, not a copy
