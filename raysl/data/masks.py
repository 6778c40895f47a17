"""I-JEPA multi-block mask sampler (Assran et al., 2023, https://arxiv.org/abs/2301.08243, §3).

A pure function of (seed, rank, step) and the patch grid: the same inputs give the same masks, and
different ranks or steps give different ones. Per batch one target-block size and one context-block size
are drawn, so every sample has M target blocks of exactly h×w patches and tensors stay rectangular.
Context = one large block minus every target patch; every sample keeps the same number of context
patches (the batch minimum, at least `min_keep`), chosen at random among its visible ones.
Indices are row-major positions in the patch grid, excluding any class token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MaskSpec:
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    context_aspect: tuple[float, float] = (1.0, 1.0)
    min_keep: int = 4
    max_tries: int = 20


def block_size(rng: np.random.Generator, grid: tuple[int, int], scale: tuple[float, float],
               aspect: tuple[float, float]) -> tuple[int, int]:
    """Height and width (in patches) of a block covering `scale` of the grid with aspect h/w in `aspect`."""
    gh, gw = grid
    s = rng.uniform(*scale)
    log_a = rng.uniform(math.log(aspect[0]), math.log(aspect[1]))
    a = math.exp(log_a)
    area = s * gh * gw
    h = int(round(math.sqrt(area * a)))
    w = int(round(math.sqrt(area / a)))
    return min(max(h, 1), gh), min(max(w, 1), gw)


def _block(rng: np.random.Generator, grid: tuple[int, int], h: int, w: int) -> np.ndarray:
    """Boolean (gh, gw) mask of one h×w block at a uniformly random position inside the grid."""
    gh, gw = grid
    top = int(rng.integers(0, gh - h + 1))
    left = int(rng.integers(0, gw - w + 1))
    m = np.zeros(grid, dtype=bool)
    m[top : top + h, left : left + w] = True
    return m


def sample_masks(seed: int, rank: int, step: int, batch_size: int, grid: tuple[int, int],
                 spec: MaskSpec = MaskSpec()) -> tuple[np.ndarray, np.ndarray]:
    """Return (context_idx (B, Nc), target_idx (B, M, Nt)) as int64 patch indices."""
    rng = np.random.default_rng([seed, rank, step])
    th, tw = block_size(rng, grid, spec.target_scale, spec.target_aspect)
    ch, cw = block_size(rng, grid, spec.context_scale, spec.context_aspect)
    targets = np.empty((batch_size, spec.num_targets, th * tw), dtype=np.int64)
    visible: list[np.ndarray] = []
    for b in range(batch_size):
        for _ in range(spec.max_tries):
            blocks = [_block(rng, grid, th, tw) for _ in range(spec.num_targets)]
            context = _block(rng, grid, ch, cw) & ~np.logical_or.reduce(blocks)
            if context.sum() >= spec.min_keep:
                break
        else:  # the grid is too small for these scales: keep the best we can, still disjoint
            context = ~np.logical_or.reduce(blocks)
            if context.sum() < 1:
                raise ValueError(f"grid {grid} leaves no context patch with {spec.num_targets} targets of {th}x{tw}")
        for m, blk in enumerate(blocks):
            targets[b, m] = np.flatnonzero(blk)
        visible.append(np.flatnonzero(context))
    keep = min(len(v) for v in visible)
    context_idx = np.stack([np.sort(rng.choice(v, keep, replace=False)) for v in visible])
    return context_idx.astype(np.int64), targets
