"""BYOL: loss as in the paper, symmetric in the views, gradients to the online network only."""

import pytest
import torch
import torch.nn.functional as F

from raysl.config import parse_config
from raysl.methods import get_method
from raysl.methods.byol import byol_loss, embedding_std, regression_loss


def _cfg(**method):
    return parse_config({"data": {"uri": "/x"}, "model": {"backbone": "resnet18", "image_size": 32},
                         "method": {"projector_hidden": 64, "projector_dim": 16, "predictor_hidden": 64, **method}})


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"view1": torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
            "view2": torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)}


def test_regression_loss_is_normalized_mse() -> None:
    q, z = torch.randn(8, 5), torch.randn(8, 5)
    mse = ((F.normalize(q, dim=-1) - F.normalize(z, dim=-1)) ** 2).sum(-1)
    torch.testing.assert_close(regression_loss(q, z), mse)
    assert regression_loss(q, 3 * q).abs().max() < 1e-6  # scale-invariant, zero when aligned


def test_loss_is_symmetric_in_views() -> None:
    q1, q2, z1, z2 = (torch.randn(8, 5) for _ in range(4))
    torch.testing.assert_close(byol_loss(q1, q2, z1, z2), byol_loss(q2, q1, z2, z1))


def test_model_loss_symmetric_when_views_swap() -> None:
    torch.manual_seed(0)
    model = get_method("byol").build(_cfg()).eval()  # eval: BN uses running stats, so order can't matter
    b = _batch()
    swapped = {"view1": b["view2"], "view2": b["view1"]}
    with torch.no_grad():
        torch.testing.assert_close(model(b)["loss"], model(swapped)["loss"])


def test_gradients_reach_online_never_target() -> None:
    torch.manual_seed(0)
    model = get_method("byol").build(_cfg())
    out = model(_batch())
    out["loss"].backward()
    online = [*model.backbone.parameters(), *model.projector.parameters(), *model.predictor.parameters()]
    assert all(p.grad is not None for p in online)
    assert sum(float(p.grad.abs().sum()) for p in online) > 0
    target = [*model.target_backbone.parameters(), *model.target_projector.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in target)


def test_on_step_end_moves_target_toward_online() -> None:
    torch.manual_seed(0)
    model = get_method("byol").build(_cfg(tau_base=0.9))
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    t_before = [p.clone() for p in model.target_backbone.parameters()]
    metrics = model.on_step_end(0, 10)  # step 0: τ = τ_base
    assert metrics["tau"] == pytest.approx(0.9)
    for b, t, o in zip(t_before, model.target_backbone.parameters(), model.backbone.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)


def test_embedding_std_detects_collapse() -> None:
    assert float(embedding_std(torch.ones(16, 8))) < 1e-6
    assert float(embedding_std(torch.randn(512, 64))) == pytest.approx(64 ** -0.5, rel=0.15)


def test_encoder_is_the_online_backbone() -> None:
    model = get_method("byol").build(_cfg())
    assert model.encoder() is model.backbone


def test_unknown_method_lists_registered() -> None:
    with pytest.raises(ValueError, match="byol"):
        get_method("simclr")
