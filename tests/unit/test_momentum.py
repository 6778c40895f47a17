"""EMA target: the schedule, the exact update rule, and that gradients never reach it."""

import math

import pytest
import torch
import torch.nn as nn

from raysl.methods.momentum import cosine_tau, ema_update, linear_tau, make_target


def test_cosine_tau_endpoints_and_monotone() -> None:
    assert cosine_tau(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_tau(100, 100, 0.996) == pytest.approx(1.0)
    assert cosine_tau(50, 100, 0.996) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 2) + 1) / 2)
    taus = [cosine_tau(k, 100, 0.99) for k in range(101)]
    assert all(a <= b for a, b in zip(taus, taus[1:], strict=False))


def test_linear_tau() -> None:
    assert linear_tau(0, 10, 0.996) == pytest.approx(0.996)
    assert linear_tau(5, 10, 0.996) == pytest.approx(0.998)
    assert linear_tau(10, 10, 0.996) == pytest.approx(1.0)


def test_ema_update_follows_the_rule_exactly() -> None:
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    target = make_target(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
        online[1].running_mean.add_(1.0)
    before = [p.clone() for p in target.parameters()]
    ema_update(target, online, 0.9)
    for b, t, o in zip(before, target.parameters(), online.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
    torch.testing.assert_close(target[1].running_mean, online[1].running_mean)


def test_target_is_frozen() -> None:
    online = nn.Linear(4, 3)
    target = make_target(online)
    assert all(not p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in online.parameters())
