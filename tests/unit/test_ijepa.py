"""I-JEPA: gradients never reach the target encoder, the target follows the momentum rule exactly, the
context encoder's compute falls with the visible fraction, and masks index patches (not the class token)."""

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from raysl.config import parse_config
from raysl.methods import get_method
from raysl.methods.ijepa import gather_blocks, vit_tokens
from raysl.train.optim import weight_decay_at


def _model(**model):
    cfg = parse_config({
        "data": {"uri": "/x"},
        "method": {"name": "ijepa", "predictor_depth": 2, "predictor_width": 96, "predictor_heads": 3},
        "model": {"backbone": "vit_tiny_patch16_224", "image_size": 32, "patch_size": 4, **model},
    })
    torch.manual_seed(0)
    return get_method("ijepa").build(cfg)


def _model_with(eval_k: int = 20, **method):
    cfg = parse_config({
        "data": {"uri": "/x"},
        "eval": {"k": eval_k},
        "method": {"name": "ijepa", "predictor_depth": 2, "predictor_width": 96, "predictor_heads": 3, **method},
        "model": {"backbone": "vit_tiny_patch16_224", "image_size": 32, "patch_size": 4},
    })
    return get_method("ijepa").build(cfg)


def _batch(model, n: int = 4, step: int = 1):
    g = torch.Generator().manual_seed(step)
    return model.collate({"image": torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)}, step, 0)


def test_gradients_reach_context_and_predictor_never_target() -> None:
    model = _model()
    model(_batch(model))["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.target_encoder.parameters())
    assert sum(float(p.grad.abs().sum()) for p in model.predictor.parameters() if p.grad is not None) > 0
    unused = [n for n, p in model.context_encoder.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused  # DDP requires every trainable parameter to take part in the loss


def test_encoder_positions_are_fixed_sincos_and_shared_with_the_target() -> None:
    from timm.layers import build_sincos2d_pos_embed

    model = _model()
    pos = model.context_encoder.pos_embed  # (1, 1 + 64, D): class token slot first
    assert not pos.requires_grad
    torch.testing.assert_close(pos[0, 1:], build_sincos2d_pos_embed([8, 8], dim=pos.shape[-1]).reshape(64, -1))
    assert float(pos[0, 0].abs().sum()) == 0.0
    torch.testing.assert_close(model.target_encoder.pos_embed, pos)
    learned = _model_with(sincos_positions=False).context_encoder.pos_embed
    assert learned.requires_grad


def test_target_moves_by_the_momentum_rule() -> None:
    model = _model()
    with torch.no_grad():
        for p in model.context_encoder.parameters():
            p.add_(0.5)
    before = [p.clone() for p in model.target_encoder.parameters()]
    assert model.on_step_end(5, 10)["tau"] == pytest.approx(0.998)  # linear 0.996 → 1.0, halfway
    for b, t, o in zip(before, model.target_encoder.parameters(), model.context_encoder.parameters(), strict=True):
        torch.testing.assert_close(t, 0.998 * b + 0.002 * o)


def test_context_compute_falls_with_visible_fraction() -> None:
    model = _model()
    x = torch.randn(2, 3, 32, 32)

    def flops(keep):
        with FlopCounterMode(display=False) as counter:
            vit_tokens(model.context_encoder, x, keep=keep)
        return counter.get_total_flops()

    full = flops(None)
    quarter = flops(torch.arange(16).repeat(2, 1))
    assert quarter < 0.35 * full  # 16 of 64 patches: the blocks run on a quarter of the tokens


@pytest.mark.parametrize("class_token", [True, False])
def test_masks_index_patches_not_the_class_token(class_token: bool) -> None:
    model = _model(backbone_kwargs={"class_token": class_token})
    vit = model.context_encoder
    assert vit.num_prefix_tokens == int(class_token)
    vit.blocks = nn.Sequential()  # no mixing: each output token must be its own patch's embedding
    x = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[0, 5, 63], [7, 8, 9]])
    full, part = vit_tokens(vit, x), vit_tokens(vit, x, keep=keep)
    assert full.shape == (2, 64, vit.num_features)
    torch.testing.assert_close(part, torch.stack([full[b, keep[b]] for b in range(2)]))
    idx = torch.tensor([[[1, 2], [3, 4]], [[5, 6], [7, 8]]])
    torch.testing.assert_close(gather_blocks(full, idx)[1, 0], full[1, [5, 6]])


def test_loss_and_targets_are_finite_and_normalized() -> None:
    model = _model()
    out = model(_batch(model))
    assert torch.isfinite(out["loss"]) and 0.5 < float(out["target_std"]) < 1.5
    assert 0.0 < float(out["context_fraction"]) < 1.0


def test_encoder_is_the_target_with_average_pooling() -> None:
    model = _model()
    assert model.encoder() is model.target_encoder and model.encoder().global_pool == "avg"
    context = _model_with(export_encoder="context")
    assert context.encoder() is context.context_encoder


@pytest.mark.parametrize("export", ["target", "context"])
def test_online_metrics_score_the_encoder_that_is_not_exported(export: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import raysl.methods.ijepa as ijepa_module

    model = _model_with(eval_k=7, export_encoder=export)
    scored: list[nn.Module] = []

    def fake_knn(encoder: nn.Module, images, labels, mean, std, device, k: int = 20) -> float:
        assert k == 7  # eval.k, as the shared online kNN uses
        scored.append(encoder)
        assert images.shape == (6, 3, 32, 32) and labels.tolist() == [0, 1, 0, 1, 0, 1]
        return 0.5

    monkeypatch.setattr(ijepa_module, "split_knn", fake_knn)
    data = {"image": torch.zeros(6, 3, 32, 32, dtype=torch.uint8).numpy(), "label": [0, 1] * 3}
    other = "context" if export == "target" else "target"
    assert model.online_metrics(data) == {f"{other}_knn_top1": 0.5}
    assert scored == [getattr(model, f"{other}_encoder")] and model.encoder() is not scored[0]


def test_weight_decay_schedule() -> None:
    cfg = parse_config({"data": {"uri": "/x"}, "optim": {"weight_decay": 0.04, "weight_decay_end": 0.4}}).optim
    assert weight_decay_at(cfg, 0, 100) == pytest.approx(0.04)
    assert weight_decay_at(cfg, 50, 100) == pytest.approx(0.22)
    assert weight_decay_at(cfg, 100, 100) == pytest.approx(0.4)
