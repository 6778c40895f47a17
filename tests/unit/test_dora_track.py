"""DoRA's discovery and tracking (raysl/methods/dora_track.py) on their own, without learning: Sinkhorn's marginals,
objects found on a synthetic anchor frame and followed as they move and occlude, disjoint non-empty masks under
the fallbacks, and the last-block parts against timm's own forward pass.

Thresholds were measured over 300 seeds of the synthetic scene (noise 0.5 per dim, signal 3 along each object's
direction, d = 32): tracked IoU min 0.78, 1st percentile 0.80, mean 0.90; random keys: max 0.14, mean 0.10.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import timm
import torch

from raysl.methods.dora_track import (
    LastBlock,
    discover,
    last_block_parts,
    mask_iou,
    pixel_masks,
    random_heads,
    sinkhorn,
    track,
)

G, D, T, K = 8, 32, 6, 3
SIZES = ((3, 3), (3, 2), (2, 3))  # (rows, cols) of each object, in patches


def corners(t: int) -> list[tuple[int, int]]:
    """Top-left patch of each object in frame t: 0 moves right, 2 moves left, 1 moves left and in frame 3 up into
    object 0, which occludes it there (two of its six patches)."""
    return [(0, t), (2 if t == 3 else 3, 6 - t), (6, 5 - t)]


def scene(seed: int, noise: float = 0.5, amp: float = 3.0) -> tuple[torch.Tensor, ...]:
    """Labels (T, N) (-1: background) and three independent draws (tokens, queries, keys) of (T, N, D) features:
    an object's patches share its direction (amplitude `amp`), every patch adds isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(D, D, generator=g))[0][:, :K].T
    label = torch.full((T, G, G), -1)
    for t in range(T):
        for i in reversed(range(K)):  # back to front: object 0 is drawn last, in front
            (r, c), (h, w) = corners(t)[i], SIZES[i]
            label[t, r:r + h, c:c + w] = i
    lab = label.reshape(T, G * G)

    def draw() -> torch.Tensor:
        x = noise * torch.randn(T, G * G, D, generator=g)
        for i in range(K):
            x[lab == i] += amp * directions[i]
        return x

    return lab, draw(), draw(), draw()


def truth_masks(lab: torch.Tensor) -> torch.Tensor:
    return torch.stack([lab == i for i in range(K)], dim=1).reshape(T, K, G, G)


def anchor_parts(lab: torch.Tensor, tokens: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor) -> LastBlock:
    """Frame 0 with hand-made [CLS] attention: head j puts 0.9 on object j, 0.05 spread over the rest (a row sums
    below 1, as with the [CLS]→[CLS] weight dropped)."""
    attn = torch.zeros(1, K, G * G)
    for j in range(K):
        on = lab[0] == j
        attn[0, j] = torch.where(on, 0.9 / on.sum(), 0.05 / (~on).sum())
    return LastBlock(cls_attn=attn, queries=queries[:1], keys=keys[:1], tokens=tokens[:1], cls=torch.zeros(1, D))


def check_partition(masks: torch.Tensor) -> None:
    assert masks.dtype == torch.bool
    assert (masks.sum(dim=-2) <= 1).all(), "two objects share a patch"
    assert masks.any(dim=-1).all(), "an object has an empty mask"


def reference_sinkhorn(scores: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """DoRA's formulation literally, in float64, one sample (N, k): only valid where nothing underflows."""
    q = torch.exp((scores.double() - scores.max()) / eps).T
    q /= q.sum()
    k, n = q.shape
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True) * k
        q /= q.sum(dim=0, keepdim=True) * n
    return (q * n).T


def test_sinkhorn_marginals_and_reference() -> None:
    g = torch.Generator().manual_seed(0)
    n, k = 196, 3
    for scale, col_tol in ((0.1, 1e-4), (0.5, 0.1)):  # measured column errors: 2.4e-7 and 4.0e-2 (16 samples)
        s = torch.randn(16, n, k, generator=g) * scale
        m = sinkhorn(s, iters=30, eps=0.05)
        assert m.shape == (16, n, k) and (m >= 0).all()
        torch.testing.assert_close(m.sum(dim=2), torch.ones(16, n), atol=1e-5, rtol=0)
        assert ((m.sum(dim=1) / (n / k) - 1).abs() < col_tol).all()
        torch.testing.assert_close(m[3].double(), reference_sinkhorn(s[3], 30, 0.05), atol=1e-5, rtol=1e-4)
    # More iterations balance sharper scores (30 leave ~15% on unit-scale scores: DoRA's setting, kept).
    s = torch.randn(16, n, k, generator=g)
    assert (sinkhorn(s, iters=100).sum(dim=1) / (n / k) - 1).abs().max() < 0.03


def test_sinkhorn_survives_underflow_and_nonfinite_scores() -> None:
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 64, 3, generator=g) * 50  # exp((S − max)/0.05) underflows for most patches in float32
    s[0, 5, 1], s[1, 7, 0], s[2, 9, 2] = float("nan"), float("inf"), -float("inf")
    s[3] = float("nan")
    m = sinkhorn(s)
    assert torch.isfinite(m).all() and (m >= 0).all()
    torch.testing.assert_close(m.sum(dim=2), torch.ones(4, 64), atol=1e-5, rtol=0)
    torch.testing.assert_close(m[3], torch.full((64, 3), 1 / 3))  # no finite score: uniform
    assert m[1, 7, 0] > 0.99  # +inf: the patch's best object


def test_tracks_moving_occluding_objects() -> None:
    """Prototypes from the anchor follow their objects through motion and a partial occlusion; the same prototypes
    against random keys (the control) do not. Per seed and on average over 20 seeds (thresholds: module doc)."""
    ious, controls = [], []
    for seed in range(20):
        lab, tokens, queries, keys = scene(seed)
        protos = discover(anchor_parts(lab, tokens, queries, keys), torch.arange(K))
        assert protos.shape == (1, K, D)
        masks = track(protos, keys[None])
        assert masks.shape == (1, T, K, G * G)
        check_partition(masks)
        ious.append(mask_iou(masks[0].reshape(T, K, G, G), truth_masks(lab)))
        rand = torch.randn(1, T, G * G, D, generator=torch.Generator().manual_seed(seed)) * 2
        control = track(protos, rand)
        check_partition(control)
        controls.append(mask_iou(control[0].reshape(T, K, G, G), truth_masks(lab)))
    assert min(ious) > 0.7 and sum(ious) / len(ious) > 0.85, ious
    assert max(controls) < 0.25 and sum(controls) / len(controls) < 0.15, controls


def test_discover_batch_and_per_sample_heads() -> None:
    """Per-sample heads (B, k) pick each sample's maps: swapping the heads swaps the prototypes."""
    lab, tokens, queries, keys = scene(0)
    one = anchor_parts(lab, tokens, queries, keys)
    two = LastBlock(*(torch.cat([getattr(one, f)] * 2) for f in ("cls_attn", "queries", "keys", "tokens", "cls")))
    protos = discover(two, torch.tensor([[0, 1, 2], [2, 1, 0]]))
    torch.testing.assert_close(protos[1], protos[0].flip(0))


def test_fallbacks_keep_masks_disjoint_and_nonempty() -> None:
    n = 16
    keys = torch.randn(2, T, n, D, generator=torch.Generator().manual_seed(0))
    uniform = track(torch.zeros(2, K, D), keys)  # a = 1/N everywhere: nothing is above uniform
    check_partition(uniform)
    assert (uniform.sum(dim=-1) == math.ceil(n / (2 * K))).all()
    p = torch.randn(2, 1, D) * 5
    same = track(p.expand(-1, K, -1), keys)  # three copies of one prototype: the first wins, the others fall back
    check_partition(same)
    # Two objects hold every patch, the third must take one from an object that keeps one.
    key = torch.zeros(1, 1, 4, 2)
    key[0, 0, :2, 0], key[0, 0, 2:, 1] = 1.0, 1.0
    masks = track(torch.tensor([[[9.0, 0.0], [0.0, 9.0], [0.0, 0.0]]]), key)
    check_partition(masks)
    assert masks.sum() == 4 and masks[0, 0, 2].sum() == 1
    for seed in range(50):  # random scales and as many objects as patches
        g = torch.Generator().manual_seed(seed)
        k = int(torch.randint(1, 6, (1,), generator=g))
        check_partition(track(torch.randn(3, k, 8, generator=g) * 10 ** float(torch.rand(1, generator=g) * 3),
                              torch.randn(3, 2, k + seed % 3, 8, generator=g)))
    with pytest.raises(ValueError):
        track(torch.randn(1, 5, 8), torch.randn(1, 1, 4, 8))


def test_pixel_masks_are_patch_constant() -> None:
    masks = torch.rand(2, T, K, G * G, generator=torch.Generator().manual_seed(0)) > 0.5
    px = pixel_masks(masks, (G, G), 64)
    assert px.shape == (2, T, K, 1, 64, 64) and px.dtype == torch.float32
    blocks = px.reshape(2, T, K, G, 8, G, 8)
    assert (blocks == blocks[..., :1, :, :1]).all()
    assert torch.equal(blocks[..., 0, :, 0].reshape(2, T, K, -1).bool(), masks)
    assert pixel_masks(masks, (G, G), 64, dtype=torch.bool).dtype == torch.bool


def test_random_heads_and_iou_helper() -> None:
    heads = random_heads(6, 3, torch.Generator().manual_seed(0))
    assert heads.shape == (3,) and len(set(heads.tolist())) == 3 and 0 <= heads.min() and heads.max() < 6
    assert torch.equal(heads, random_heads(6, 3, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError):
        random_heads(2, 3)
    truth = truth_masks(scene(0)[0])
    assert mask_iou(truth.flip(1), truth) == pytest.approx(1.0)  # prototypes in another order: still matched
    assert mask_iou(truth.roll(1, dims=-1) & ~truth, truth) == pytest.approx(0.0)


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_last_block_parts_match_timm(reg_tokens: int) -> None:
    torch.manual_seed(0)
    vit: Any = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=0,
                                 reg_tokens=reg_tokens).eval()
    x = torch.randn(3, 3, 32, 32)
    parts = last_block_parts(vit, x)
    full = vit.forward_features(x)
    prefix, n, d, h = 1 + reg_tokens, 16, 192, 3
    assert parts.cls_attn.shape == (3, h, n) and parts.tokens.shape == (3, n, d) and parts.cls.shape == (3, d)
    assert parts.queries.shape == parts.keys.shape == (3, n, d) and not parts.tokens.requires_grad
    torch.testing.assert_close(parts.tokens, full[:, prefix:], atol=1e-6, rtol=0)
    torch.testing.assert_close(parts.cls, full[:, 0], atol=1e-6, rtol=0)
    assert (parts.cls_attn >= 0).all() and (parts.cls_attn.sum(-1) <= 1 + 1e-6).all()
    # timm's own (non-fused) attention weights, caught where they enter attention dropout.
    attn = vit.blocks[-1].attn
    attn.fused_attn = False
    seen: list[torch.Tensor] = []
    attn.attn_drop.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
    with torch.no_grad():
        vit.forward_features(x)
    weights = seen[0]  # (B, h, L, L)
    torch.testing.assert_close(parts.cls_attn, weights[:, :, 0, prefix:], atol=1e-6, rtol=1e-5)
    # Patch→patch logits are scale·q·k up to a per-row constant (the softmax's): checks queries and keys per head.
    q = parts.queries.reshape(3, n, h, -1).transpose(1, 2)
    k = parts.keys.reshape(3, n, h, -1).transpose(1, 2)
    diff = weights[:, :, prefix:, prefix:].log() - attn.scale * q @ k.transpose(-2, -1)
    torch.testing.assert_close(diff, diff[..., :1].expand_as(diff), atol=1e-4, rtol=0)



def test_tracking_runs_in_fp32_under_autocast() -> None:
    lab, tokens, queries, keys = scene(0)
    parts = anchor_parts(lab, tokens, queries, keys)
    plain = track(discover(parts, torch.arange(K)), keys[None])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        protos = discover(parts, torch.arange(K))
        masks = track(protos, keys[None])
    assert protos.dtype == torch.float32 and torch.equal(masks, plain)

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_masks_on_gpu() -> None:
    lab, tokens, queries, keys = scene(0)
    parts = anchor_parts(lab, tokens, queries, keys)
    on_gpu = LastBlock(*(getattr(parts, f).cuda() for f in ("cls_attn", "queries", "keys", "tokens", "cls")))
    protos = discover(on_gpu, torch.arange(K))
    torch.testing.assert_close(protos.cpu(), discover(parts, torch.arange(K)), atol=1e-4, rtol=1e-4)
    masks = track(protos, keys[None].cuda())
    assert masks.is_cuda and torch.equal(masks.cpu(), track(protos.cpu(), keys[None]))
    check_partition(track(torch.zeros(2, K, D, device="cuda"), keys[None].cuda().expand(2, -1, -1, -1)))
    assert pixel_masks(masks, (G, G), 64).is_cuda
