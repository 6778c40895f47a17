"""DoRA's teacher-side multi-object discovery and tracking (Venkataramanan et al., "Is ImageNet worth 1 video?
Learning strong image encoders from 1 long unlabelled video", ICLR 2024, https://arxiv.org/abs/2310.08584).

On the anchor frame of each clip, k randomly chosen heads of the teacher's last block give k [CLS]→patch attention
maps; each weights the patch queries into an object prototype, which Sinkhorn-Knopp refines into an equal-size soft
partition of the output patch tokens (`discover`). Each prototype then cross-attends to the last-block patch keys
of every frame of the clip; the patches it attends to more than uniformly are its mask in that frame (`track`).
The masks, upsampled to pixels (`pixel_masks`), make the student's views: each frame with only one object kept.
Formulas and their sources: docs/DORA-NOTES.md, section 2. Everything here is batch-first, runs without gradients
and on any device; the method class (raysl/methods/dora.py) calls it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor


@dataclass(frozen=True)
class LastBlock:
    """What one teacher pass yields for DINO and for tracking. N patches, h heads, d = embedding width (B may be
    B·T frames)."""

    cls_attn: Tensor  # (B, h, N) each head's softmaxed [CLS]→patch attention in the last block (prefix keys dropped)
    queries: Tensor  # (B, N, d) the last block's patch queries, heads concatenated
    keys: Tensor  # (B, N, d) the last block's patch keys, heads concatenated
    tokens: Tensor  # (B, N, d) final output patch tokens (after the final norm)
    cls: Tensor  # (B, d) final output [CLS] token (the DINO head's input)

    def first_frames(self, clips: int) -> LastBlock:
        """The parts of each clip's first frame, the rows being `clips` clips of equal length, frame-major."""
        return LastBlock(**{f: getattr(self, f).unflatten(0, (clips, -1))[:, 0] for f in self.__dataclass_fields__})


@torch.no_grad()
def last_block_parts(vit: Any, x: Tensor) -> LastBlock:
    """Run a timm VisionTransformer (pre-norm blocks with a class token) on images x (B, 3, H, W) once and take its
    outputs plus its last block's attention, queries and keys.

    The last block's attention is recomputed from the block's own qkv projection (and q/k norms) on its input,
    the second-to-last block's output; timm's fused attention never materialises the weights, and hooks would
    depend on its non-fused code path. The block itself then runs unchanged, so the outputs are forward_features'.
    """
    if not getattr(vit, "has_class_token", getattr(vit, "cls_token", None) is not None):
        raise ValueError("DoRA's discovery needs a ViT with a class token ([CLS]→patch attention)")
    prefix = int(vit.num_prefix_tokens)
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    blocks = list(vit.blocks)
    for blk in blocks[:-1]:
        h = blk(h)
    last = blocks[-1]
    attn = last.attn
    b, length, _ = h.shape
    qkv = attn.qkv(last.norm1(h)).reshape(b, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # (B, h, L, hd)
    # Only the [CLS] row is needed: (B, h, 1, L) instead of the full (B, h, L, L) map; in fp32 even under autocast.
    with torch.autocast(x.device.type, enabled=False):
        weights = ((q[:, :, :1].float() * attn.scale) @ k.float().transpose(-2, -1)).softmax(dim=-1)
    n = length - prefix

    def heads_concat(t: Tensor) -> Tensor:
        return t[:, :, prefix:].transpose(1, 2).reshape(b, n, -1)

    out = vit.norm(last(h))
    return LastBlock(cls_attn=weights[:, :, 0, prefix:], queries=heads_concat(q), keys=heads_concat(k),
                     tokens=out[:, prefix:], cls=out[:, 0])


@torch.no_grad()
def sinkhorn(scores: Tensor, iters: int = 30, eps: float = 0.05) -> Tensor:
    """Soft assignment (B, N, k) of N patches to k objects from similarities (B, N, k): every patch's row sums to 1,
    every object's column to ≈ N/k (an equal-size partition; DoRA's sinkhorn_knopp, 30 iterations, ε = 0.05).

    The authors' iterations — Q = exp((S − max S)/ε) as k×N, normalised to total 1, then `iters` times: each object
    row scaled to sum 1/k, each patch column to 1/N; finally × N — carried out on log Q. In exp form a patch whose
    scores all lie more than 103·ε below the max underflows to a zero column in float32 and gives 0/0 (the authors
    patch the infs afterwards); in log form that row still sums to 1. Non-finite scores: +inf counts as the sample's
    best finite score, −inf and nan as its worst; a sample with no finite score gets uniform rows.
    """
    s = scores.float()
    finite = torch.isfinite(s)
    inf = torch.tensor(float("inf"), device=s.device)
    hi = torch.where(finite, s, -inf).amax(dim=(1, 2), keepdim=True)
    lo = torch.where(finite, s, inf).amin(dim=(1, 2), keepdim=True)
    hi, lo = torch.where(torch.isfinite(hi), hi, 0.0), torch.where(torch.isfinite(lo), lo, 0.0)
    s = torch.where(finite, s, torch.where(s == inf, hi, lo))
    log_q = (s - hi) / eps  # ≤ 0 and finite
    _, n, k = log_q.shape
    log_k, log_n = math.log(k), math.log(n)
    for _ in range(iters):
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_k  # each object: total 1/k
        log_q = log_q - torch.logsumexp(log_q, dim=2, keepdim=True) - log_n  # each patch: total 1/N
    return (log_q + log_n).exp().to(scores.dtype)


def _select_heads(cls_attn: Tensor, heads: Tensor) -> Tensor:
    """cls_attn (B, h, N), heads (k,) or (B, k) → the chosen heads' maps (B, k, N)."""
    b = cls_attn.shape[0]
    idx = heads.to(device=cls_attn.device, dtype=torch.long)
    idx = idx.expand(b, -1) if idx.dim() == 1 else idx
    return torch.gather(cls_attn, 1, idx.unsqueeze(-1).expand(-1, -1, cls_attn.shape[-1]))


@torch.no_grad()
def discover(parts: LastBlock, heads: Tensor, iters: int = 30, eps: float = 0.05) -> Tensor:
    """Object prototypes (B, k, d) from the anchor frames' LastBlock (B frames) and k head indices per sample.

    P = A·Q̃ (each chosen head's [CLS] attention weights the patch queries), S = Z̃·Pᵀ with Z̃ the L2-normalised
    output tokens, M = sinkhorn(S), P′ = Mᵀ·Z̃: an assignment-weighted sum (not a mean) of unit tokens, as DoRA's.
    """
    with torch.autocast(parts.tokens.device.type, enabled=False):  # fp32: ε = 0.05 makes S's rounding count
        attn = _select_heads(parts.cls_attn, heads).float()  # (B, k, N)
        protos = attn @ parts.queries.float()  # (B, k, d)
        z = F.normalize(parts.tokens.float(), dim=-1)  # (B, N, d)
        assign = sinkhorn(z @ protos.transpose(1, 2), iters, eps)  # (B, N, k)
        return assign.transpose(1, 2) @ z


@torch.no_grad()
def track(prototypes: Tensor, keys: Tensor) -> Tensor:
    """Masks (B, T, k, N) of k objects in T frames: prototypes (B, k, d) cross-attend to keys (B, T, N, d).

    a = softmax over patches of P′·Kᵀ/√d; object i's candidates are the patches with a_i > 1/N (above-uniform
    attention: the authors' "above the mean of the L2-normalised map", taken per map rather than over the whole
    batch tensor as their code does). Two refinements the authors' code lacks, since the student must see each
    object once, in views that never share a pixel, and never a blank view:
    - disjoint: a patch several objects claim goes to the one that puts the highest share of its attention there;
    - never empty: an object left without patches (uniform attention, or out-attended everywhere) takes its
      ⌈N/(2k)⌉ most-attended patches that no other object holds; if every patch is held, its most-attended patch
      held by an object that has more than one. Needs N ≥ k.
    """
    b, t, n, d = keys.shape
    k = prototypes.shape[1]
    if n < k:
        raise ValueError(f"cannot give {k} objects disjoint non-empty masks on {n} patches")
    with torch.autocast(keys.device.type, enabled=False):  # fp32: the 1/N threshold is a fine comparison
        logits = torch.einsum("bkd,btnd->btkn", prototypes.float(), keys.float()) / math.sqrt(d)
    a = logits.softmax(dim=-1).reshape(b * t, k, n)
    owner = F.one_hot(a.argmax(dim=1), k).transpose(1, 2).bool()  # (R, k, N): argmax object is a claimant if any
    masks = (a > 1.0 / n) & owner
    fill = math.ceil(n / (2 * k))
    for i in range(k):  # empty objects in order, so each sees the patches the previous ones took
        empty = ~masks[:, i].any(dim=1)
        if not empty.any():
            continue
        rows = empty.nonzero().squeeze(1)
        m, ai = masks[rows], a[rows, i]
        free = ~m.any(dim=1)  # (r, N)
        top = torch.where(free, ai, -torch.inf).topk(fill, dim=1).indices
        take = torch.zeros_like(free).scatter_(1, top, True) & free
        # No free patch: take the best patch from an owner that keeps at least one (N ≥ k guarantees one).
        spare = (m & (m.sum(dim=2, keepdim=True) > 1)).any(dim=1)
        best = torch.where(spare, ai, -torch.inf).argmax(dim=1)
        steal = ~free.any(dim=1)
        take[steal] = F.one_hot(best[steal], n).bool()
        m[steal] &= ~take[steal].unsqueeze(1)
        m[:, i] = take
        masks[rows] = m
    return masks.reshape(b, t, k, n)


def pixel_masks(masks: Tensor, grid: tuple[int, int], size: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Patch masks (B, T, k, N) → pixel masks (B, T, k, 1, size, size) by nearest upsampling, to multiply the
    normalised global view (a masked pixel becomes 0, the mean colour, as in the authors' code)."""
    b, t, k, n = masks.shape
    gh, gw = grid
    if gh * gw != n:
        raise ValueError(f"{n} patches do not fill a {gh}×{gw} grid")
    flat = masks.reshape(b * t * k, 1, gh, gw).to(dtype if dtype.is_floating_point else torch.float32)
    up = F.interpolate(flat, size=(size, size), mode="nearest")
    return up.to(dtype).reshape(b, t, k, 1, size, size)


def random_heads(num_heads: int, k: int, generator: torch.Generator | None = None) -> Tensor:
    """k distinct head indices out of num_heads (DoRA: one draw per step, shared by the batch)."""
    if not 1 <= k <= num_heads:
        raise ValueError(f"cannot choose {k} distinct heads out of {num_heads}")
    return torch.randperm(num_heads, generator=generator)[:k]


def mask_iou(pred: Tensor, truth: Tensor) -> float:
    """Mean IoU of tracked masks against ground truth: pred (…, k, H, W) and truth (…, m, H, W) bool, the leading
    dims being frames (a 2-D mask is one object in one frame).

    Each prototype is matched to one object for the whole clip — the Hungarian assignment on the IoU averaged over
    frames, since tracking means keeping the same object — and the matched pairs' frame-averaged IoUs are averaged.
    A pair empty in both masks of a frame scores 1 there (an occluded object correctly not tracked).
    """
    p, g = pred.bool(), truth.bool()
    if p.dim() == 2:
        p, g = p[None], g[None]
    p = p.reshape(-1, *p.shape[-3:]).flatten(2).float()  # (F, k, HW)
    g = g.reshape(-1, *g.shape[-3:]).flatten(2).float()  # (F, m, HW)
    inter = p @ g.transpose(1, 2)  # (F, k, m)
    union = p.sum(-1)[:, :, None] + g.sum(-1)[:, None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter)).mean(dim=0)
    score = iou.cpu().double().numpy()
    rows, cols = linear_sum_assignment(score, maximize=True)
    return float(np.mean(score[rows, cols]))
