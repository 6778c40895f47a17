"""Image-text contrastive losses over the global batch: CLIP's softmax (https://arxiv.org/abs/2103.00020)
and SigLIP's sigmoid (https://arxiv.org/abs/2303.15343).

Each worker holds B pairs. Features are all-gathered *with* gradients, and each worker scores only its
own B rows against all N·B columns, so memory is B×N·B per worker, never (N·B)². With `chunk` set, the
rows are scored `chunk` at a time and each block of logits is recomputed in the backward pass instead of
stored, so the loss holds chunk×N·B logits at once: linear in the global batch. The mean over workers
of the per-worker losses equals the single-process loss on the whole batch, and — because the gather's
backward sums every worker's contribution to each local feature — so do the gradients once the
optimizer's gradients are averaged over workers (DDP, or `all_reduce_grads`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Softmax / log-sigmoid in at least float32 when the towers run in bf16 or fp16."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B_r, D) on worker r → ((Σ B_r, D) in rank order, offset of this worker's rows); gradients flow
    back to each worker's rows. Workers may hold different B_r (undecodable samples are dropped before
    the loss), so rows are padded to the largest B_r for the collective and the padding cut off again."""
    rank, world = _world()
    if world == 1:
        return x, 0
    n = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    sizes = [int(c) for c in counts]
    padded = F.pad(x, (0, 0, 0, max(sizes) - x.shape[0]))
    with warnings.catch_warnings():
        # Deprecated in favour of a private functional-collectives API that lacks gloo (CPU) support
        # for its backward; this one works on gloo and NCCL alike.
        warnings.simplefilter("ignore", FutureWarning)
        parts = dist_fn.all_gather(padded)
    return torch.cat([p[:k] for p, k in zip(parts, sizes, strict=True)], dim=0), sum(sizes[:rank])


def _row_sum(fn: Callable[..., torch.Tensor], rows: tuple[torch.Tensor, ...], rest: tuple[torch.Tensor, ...],
             chunk: int | None) -> torch.Tensor:
    """Σ over row blocks of fn(*row_block, *rest); blocks are recomputed in backward, not stored."""
    n = rows[0].shape[0]
    if chunk is None or chunk >= n:
        return fn(*rows, *rest)
    total = rows[0].new_zeros((), dtype=torch.float32 if rows[0].dtype in (torch.float16, torch.bfloat16)
                              else rows[0].dtype)
    for start in range(0, n, chunk):
        block = tuple(r[start : start + chunk] for r in rows)
        total = total + checkpoint(fn, *block, *rest, use_reentrant=False)
    return total


def _ce_sum(q: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_wide(scale * q @ keys.T), labels, reduction="sum")  # q (c, D) vs keys (N·B, D)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
              chunk: int | None = None) -> torch.Tensor:
    """Symmetric InfoNCE. img, txt: (B, D) L2-normalized local features; logit_scale: scalar (not log)."""
    (all_img, offset), (all_txt, _) = gather_with_grad(img), gather_with_grad(txt)  # (N·B, D)
    b = img.shape[0]
    labels = torch.arange(b, device=img.device) + offset  # where this worker's pairs sit among all N·B
    i2t = _row_sum(_ce_sum, (img, labels), (all_txt, logit_scale), chunk)  # my images vs every caption
    t2i = _row_sum(_ce_sum, (txt, labels), (all_img, logit_scale), chunk)  # my captions vs every image
    return (i2t + t2i) / (2 * b)


def _sig_sum(q: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor,
             bias: torch.Tensor) -> torch.Tensor:
    logits = _wide(scale * q @ keys.T + bias)  # (c, N·B)
    signs = -torch.ones_like(logits)
    signs[torch.arange(len(q), device=q.device), labels] = 1.0
    return -F.logsigmoid(signs * logits).sum()


def siglip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Pairwise sigmoid loss, −1/|B| Σ_ij log σ(z_ij(t·x_i·y_j + b)), with z = +1 on matching pairs.

    Every pair is an independent binary problem, so no softmax spans the batch. The loss is symmetric
    in image and text (the pair matrix is merely transposed).
    """
    all_txt, offset = gather_with_grad(txt)  # (N·B, D)
    b = img.shape[0]
    labels = torch.arange(b, device=img.device) + offset
    return _row_sum(_sig_sum, (img, labels), (all_txt, logit_scale, logit_bias), chunk) / b


def naive_clip_loss(all_img: torch.Tensor, all_txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """The whole (N·B)² matrix on one device — the baseline `raysl bench clip-loss` compares against."""
    logits = logit_scale * all_img @ all_txt.T
    labels = torch.arange(len(all_img), device=all_img.device)
    return (F.cross_entropy(_wide(logits), labels) + F.cross_entropy(_wide(logits.T), labels)) / 2


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Average gradients over workers in one flat buffer (used where DDP's hooks are bypassed)."""
    _, world = _world()
    if world == 1 or not params:
        return
    for p in params:  # every worker must contribute the same buffer, even if a parameter got no gradient
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
