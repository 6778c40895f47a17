"""I-JEPA masks: in bounds, block sizes within the configured ranges, context and targets disjoint,
reproducible for a seed, different across ranks and steps."""

import numpy as np
import pytest

from raysl.data.masks import MaskSpec, block_size, sample_masks


@pytest.mark.parametrize("grid", [(8, 8), (14, 14), (16, 16), (12, 20)])
def test_masks_in_bounds_and_disjoint(grid: tuple[int, int]) -> None:
    n = grid[0] * grid[1]
    for step in range(20):
        ctx, tgt = sample_masks(0, 0, step, 16, grid)
        assert ctx.min() >= 0 and ctx.max() < n and tgt.min() >= 0 and tgt.max() < n
        assert tgt.shape[:2] == (16, 4) and ctx.shape[0] == 16
        for b in range(16):
            assert len(set(ctx[b])) == ctx.shape[1]  # no duplicate context patch
            assert not set(ctx[b]) & set(tgt[b].ravel())  # context never sees a target patch
        assert ctx.shape[1] >= MaskSpec().min_keep


def test_target_blocks_are_rectangles_within_scale_and_aspect() -> None:
    grid, spec = (14, 14), MaskSpec()
    for step in range(30):
        _, tgt = sample_masks(1, 0, step, 4, grid, spec)
        for block in tgt.reshape(-1, tgt.shape[-1]):
            rows, cols = np.unravel_index(block, grid)
            h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
            assert h * w == len(block)  # a solid rectangle
            # rounding to whole patches widens the ranges by at most half a patch a side
            assert 0.15 * 196 * 0.7 <= h * w <= 0.2 * 196 * 1.35
            assert 0.75 * 0.7 <= h / w <= 1.5 * 1.4


def test_block_size_ranges() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = block_size(rng, (32, 32), (0.15, 0.2), (0.75, 1.5))
        assert 0.13 <= h * w / 1024 <= 0.22 and 0.7 <= h / w <= 1.6


def test_same_seed_same_masks_different_rank_or_step_differs() -> None:
    a = sample_masks(7, 0, 3, 8, (14, 14))
    b = sample_masks(7, 0, 3, 8, (14, 14))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    other_rank = sample_masks(7, 1, 3, 8, (14, 14))
    other_step = sample_masks(7, 0, 4, 8, (14, 14))
    assert not np.array_equal(a[1], other_rank[1]) and not np.array_equal(a[1], other_step[1])


def test_small_grid_kept_fraction() -> None:
    kept = [sample_masks(0, 0, s, 64, (8, 8))[0].shape[1] / 64 for s in range(50)]
    assert 0.05 < float(np.mean(kept)) < 0.5  # the paper's settings leave a small context on 8×8
