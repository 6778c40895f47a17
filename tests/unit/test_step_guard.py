"""A NaN step changes nothing: no update, BatchNorm statistics and the EMA target as they were."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from raysl.train.step_guard import StepGuard


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))


def step(model: nn.Module, guard: StepGuard, x: torch.Tensor, opt: torch.optim.Optimizer) -> bool:
    opt.zero_grad(set_to_none=True)
    guard.before_forward()
    model(x).pow(2).mean().backward()
    ok = guard.after_backward()
    if ok:
        opt.step()
    return ok


def state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_nan_batch_leaves_weights_and_batchnorm_statistics_unchanged() -> None:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = StepGuard(model)
    assert step(model, guard, torch.randn(4, 3, 8, 8), opt)
    before = state(model)
    x = torch.randn(4, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    assert not step(model, guard, x, opt)
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "a NaN step changed the model"
    assert all(p.grad is None for p in model.parameters())
    assert step(model, guard, torch.randn(4, 3, 8, 8), opt)  # the next good step trains again
    assert not torch.equal(state(model)["1.running_mean"], before["1.running_mean"])


def test_ema_target_copied_after_a_skipped_step_stays_finite() -> None:
    model = net()
    target = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = StepGuard(model)
    assert not step(model, guard, torch.full((4, 3, 8, 8), float("nan")), opt)
    with torch.no_grad():  # what an EMA step after the skipped one would copy into the target
        for t, o in zip(target.buffers(), model.buffers(), strict=True):
            t.copy_(o)
    assert all(torch.isfinite(b.float()).all() for b in target.buffers())


def test_clipping_bounds_the_gradient_norm() -> None:
    model = net()
    guard = StepGuard(model, clip_grad_norm=1e-3)
    guard.before_forward()
    (model(torch.randn(4, 3, 8, 8)) * 1e4).sum().backward()
    assert guard.after_backward() and guard.last_norm > 1e-3
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert float(total) <= 1e-3 * 1.01


def test_byol_nan_step_leaves_online_target_and_statistics_exactly_as_they_were() -> None:
    """The loop's order with a real method: guard, forward+backward on a NaN batch (via the chaos hook the
    loop installs), no optimizer step and no EMA step; online and EMA target networks are bit-identical."""
    from raysl.config import parse_config
    from raysl.methods import get_method
    from raysl.train.loop import _nan_hook

    cfg = parse_config({"data": {"uri": "/x"}, "model": {"backbone": "resnet10t", "image_size": 32},
                        "method": {"projector_hidden": 32, "projector_dim": 8, "predictor_hidden": 32}})
    torch.manual_seed(0)
    method = get_method("byol").build(cfg)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    guard, current = StepGuard(method), [0]
    _nan_hook(method.encoder(), {2}, current)
    batch = {v: torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8) for v in ("view1", "view2")}

    def one_step(step: int) -> bool:
        current[0] = step
        opt.zero_grad(set_to_none=True)
        guard.before_forward()
        method.forward_backward(method, batch)
        ok = guard.after_backward()
        if ok:
            opt.step()
            method.on_step_end(step, 10)
        return ok

    assert one_step(1)
    before = state(method)
    assert not one_step(2)  # the encoder's input is NaN at step 2
    after = state(method)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"a NaN step changed {changed[:5]}"
    assert one_step(3) and all(torch.isfinite(v.float()).all() for v in state(method).values())
