"""Pictures logged to MLflow: a grid of a batch's augmented views, and a 2-D PCA map of embeddings.

The grid knows no method: it takes every image-like column of a batch (N,C,H,W with C = 1 or 3; uint8 as
the data pipeline emits them, or float normalized with the encoder's mean/std) and puts the same few
samples of each column side by side, so a person sees what each view's augmentation did. matplotlib is
imported only for the embedding plot, with the Agg backend (no display on workers or servers).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits


def image_columns(batch: Mapping[str, Any]) -> list[str]:
    """Names of the columns that hold images: 4-D, channels first, 1 or 3 channels, uint8 or float."""
    cols = []
    for name, value in batch.items():
        shape, dtype = getattr(value, "shape", None), str(getattr(value, "dtype", ""))
        if shape is not None and len(shape) == 4 and shape[1] in (1, 3) and ("uint8" in dtype or "float" in dtype):
            cols.append(name)
    return cols


def to_uint8(images: Any, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(N,C,H,W) → (N,H,W,3) uint8. Float images are taken as normalized with `mean`/`std` and undone."""
    x = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if x.dtype != np.uint8:
        m = np.asarray(mean, dtype=np.float32)[: x.shape[1]].reshape(1, -1, 1, 1)
        s = np.asarray(std, dtype=np.float32)[: x.shape[1]].reshape(1, -1, 1, 1)
        x = np.clip((x.astype(np.float32) * s + m) * 255.0, 0, 255).round().astype(np.uint8)
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def batch_grid(batch: Mapping[str, Any], mean: Sequence[float], std: Sequence[float], *, samples: int = 8,
               min_tile: int = 96, pad: int = 2) -> tuple[np.ndarray, list[str]]:
    """One row per image-like column, the same `samples` samples across: (H,W,3) uint8, and the row names.

    A sample's views sit one above the other, so what each augmentation did shows at a glance. Small
    images are enlarged (nearest neighbour) to at least `min_tile` pixels.
    """
    cols = image_columns(batch)
    if not cols:
        raise ValueError(f"no image-like column (N,C,H,W) in batch columns {sorted(batch)}")
    tiles = {c: to_uint8(batch[c][:samples], mean, std) for c in cols}
    n = min(len(t) for t in tiles.values())
    h = max(t.shape[1] for t in tiles.values())
    w = max(t.shape[2] for t in tiles.values())
    scale = max(1, -(-min_tile // max(h, w)))
    th, tw = h * scale, w * scale
    grid = np.full((len(cols) * (th + pad) + pad, n * (tw + pad) + pad, 3), 255, dtype=np.uint8)
    for i, c in enumerate(cols):
        for j in range(n):
            tile = tiles[c][j].repeat(scale, axis=0).repeat(scale, axis=1)
            y, x = pad + i * (th + pad), pad + j * (tw + pad)
            grid[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
    return grid, cols


def grid_png(grid: np.ndarray, row_names: Sequence[str] = ()) -> bytes:
    """A grid as PNG bytes, each row named in a strip on the left (PIL's built-in font)."""
    from PIL import Image, ImageDraw

    margin = 8 + 7 * max((len(str(r)) for r in row_names), default=0) if row_names else 0
    img = Image.new("RGB", (grid.shape[1] + margin, grid.shape[0]), "white")
    img.paste(Image.fromarray(grid), (margin, 0))
    if row_names:
        draw = ImageDraw.Draw(img)
        height = grid.shape[0] / len(row_names)
        for i, name in enumerate(row_names):
            draw.text((4, int((i + 0.5) * height) - 6), str(name), fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def batch_png(batch: Mapping[str, Any], mean: Sequence[float], std: Sequence[float], samples: int = 8) -> bytes:
    """The grid of a batch's image columns as a titled PNG (see batch_grid)."""
    grid, cols = batch_grid(batch, mean, std, samples=samples)
    return grid_png(grid, cols)


def pca_2d(x: np.ndarray) -> np.ndarray:
    """The first two principal components of the rows of `x` (N,D) → (N,2)."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    with threadpool_limits(limits=1, user_api="blas"):  # small; OpenBLAS's spinning threads crawl on a busy machine
        _, _, vt = np.linalg.svd(x, full_matrices=False)
    out = x @ vt[:2].T
    if out.shape[1] < 2:  # one feature: a flat second axis
        out = np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    return out


def embedding_plot(panels: Mapping[str, np.ndarray], labels: np.ndarray, class_names: Sequence[str], *,
                   max_points: int = 3000, seed: int = 0, title: str = "") -> bytes:
    """PNG of one PCA scatter per feature set (e.g. pretrained and random init), coloured by label, with a
    legend of class names. `labels` index `class_names`."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe to repeat
    import matplotlib.pyplot as plt

    labels = np.asarray(labels)
    pick = np.arange(len(labels))
    if len(pick) > max_points:
        pick = np.sort(np.random.default_rng(seed).choice(len(pick), max_points, replace=False))
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 1.5, 5), squeeze=False)
    try:
        for ax, (name, feats) in zip(axes[0], panels.items(), strict=True):
            xy = pca_2d(np.asarray(feats)[pick])
            for k, cname in enumerate(class_names):
                sel = labels[pick] == k
                if sel.any():
                    ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.7, color=cmap(k % cmap.N), label=str(cname))
            ax.set_title(f"{name} (PCA)")
            ax.set_xticks([])
            ax.set_yticks([])
        handles, names = axes[0][-1].get_legend_handles_labels()
        fig.legend(handles, names, loc="center right", title="class", markerscale=3, frameon=False)
        if title:
            fig.suptitle(title)
        fig.tight_layout(rect=(0, 0, 1 - 1.2 / fig.get_figwidth(), 1))
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        return buf.getvalue()
    finally:
        plt.close(fig)
