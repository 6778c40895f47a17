"""Image-text contrastive losses over the global batch: CLIP's softmax (https://arxiv.org/abs/2103.00020)
and SigLIP's sigmoid (https://arxiv.org/abs/2303.15343).

Each worker holds B pairs. Features are all-gathered *with* gradients, and each worker scores only its
own B rows against all N·B columns, so memory is B×N·B per worker, never (N·B)². The mean over workers
of the per-worker losses equals the single-process loss on the whole batch, and — because the gather's
backward sums every worker's contribution to each local feature — so do the gradients once the
optimizer's gradients are averaged over workers (DDP, or `all_reduce_grads`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Softmax / log-sigmoid in at least float32 when the towers run in bf16 or fp16."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, D) on every worker → (N·B, D) in rank order; gradients flow back to each worker's rows."""
    _, world = _world()
    if world == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE. img, txt: (B, D) L2-normalized local features; logit_scale: scalar (not log)."""
    rank, _ = _world()
    all_img, all_txt = gather_with_grad(img), gather_with_grad(txt)  # (N·B, D)
    b = img.shape[0]
    labels = torch.arange(b, device=img.device) + rank * b  # this worker's pairs sit at rank·B … rank·B+B−1
    logits_img = logit_scale * img @ all_txt.T  # (B, N·B): my images vs every caption
    logits_txt = logit_scale * txt @ all_img.T  # (B, N·B): my captions vs every image
    return (F.cross_entropy(_wide(logits_img), labels) + F.cross_entropy(_wide(logits_txt), labels)) / 2


def siglip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
    """Pairwise sigmoid loss, −1/|B| Σ_ij log σ(z_ij(t·x_i·y_j + b)), with z = +1 on matching pairs.

    Every pair is an independent binary problem, so no softmax spans the batch. The loss is symmetric
    in image and text (the pair matrix is merely transposed).
    """
    rank, _ = _world()
    all_txt = gather_with_grad(txt)  # (N·B, D)
    b = img.shape[0]
    logits = _wide(logit_scale * img @ all_txt.T + logit_bias)  # (B, N·B)
    signs = -torch.ones_like(logits)
    idx = torch.arange(b, device=img.device)
    signs[idx, idx + rank * b] = 1.0
    return -F.logsigmoid(signs * logits).sum() / b


def naive_clip_loss(all_img: torch.Tensor, all_txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """The whole (N·B)² matrix on one device — the baseline `raysl bench clip-loss` compares against."""
    logits = logit_scale * all_img @ all_txt.T
    labels = torch.arange(len(all_img), device=all_img.device)
    return (F.cross_entropy(_wide(logits), labels) + F.cross_entropy(_wide(logits.T), labels)) / 2


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Average gradients over workers in one flat buffer (used where DDP's hooks are bypassed)."""
    _, world = _world()
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
