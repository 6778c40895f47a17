"""DoRA's clip views (raysl/data/clip_views.py): shapes and dtypes, one crop and flip shared by a clip's frames
(read back from position-coded frames), per-frame colours and local crops, invalid and ragged rows."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from raysl.data.clip_views import ClipViews

T, G, S, L = 4, 32, 16, 3
NO_COLOUR: dict[str, Any] = {"jitter_p": 0.0, "gray_p": 0.0, "blur_p": (0.0, 0.0)}


def coded_clip(h: int, w: int, t: int = T) -> np.ndarray:
    """uint8 (t, h, w, 3): red codes the column, green the row, blue the frame index."""
    x = np.broadcast_to(np.linspace(0, 255, w), (h, w))
    y = np.broadcast_to(np.linspace(0, 255, h)[:, None], (h, w))
    frame = np.stack([x, y, np.zeros((h, w))], axis=-1).round().astype(np.uint8)
    clip = np.repeat(frame[None], t, axis=0)
    clip[..., 2] = (40 * np.arange(t)).reshape(t, 1, 1)
    return clip


def batch_of(clips: list[np.ndarray], ok: list[bool] | None = None, ragged: bool = False) -> dict[str, np.ndarray]:
    if ragged:
        frames = np.empty(len(clips), dtype=object)
        for i, c in enumerate(clips):
            frames[i] = c
    else:
        frames = np.stack(clips)
    return {"frames": frames, "key": np.array([f"v{i}.mp4#0" for i in range(len(clips))]),
            "ok": np.array(ok if ok is not None else [True] * len(clips))}


def test_shapes_dtypes_and_keys() -> None:
    out = ClipViews(G, S, L, seed=0)(batch_of([coded_clip(48, 64) for _ in range(3)]))
    assert out["clip"].shape == (3, T, 3, G, G) and out["clip"].dtype == np.uint8
    assert out["locals"].shape == (3, T, L, 3, S, S) and out["locals"].dtype == np.uint8
    assert out["valid"].tolist() == [True] * 3 and out["key"].tolist() == ["v0.mp4#0", "v1.mp4#0", "v2.mp4#0"]
    assert out["clip"].any() and out["locals"].any()


def test_frames_share_crop_and_flip() -> None:
    """Without colour augmentation every frame of a clip has the same red/green (position) planes, and the crop
    covers at least the global scale's share of the frame; local crops differ between frames and are smaller."""
    views = ClipViews(G, S, L, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), seed=1, **NO_COLOUR)
    out = views(batch_of([coded_clip(60, 80) for _ in range(16)]))
    clip, local = out["clip"].astype(int), out["locals"].astype(int)
    assert (clip[:, :, :2] == clip[:, :1, :2]).all()
    assert (clip[:, :, 2] == (40 * np.arange(T)).reshape(1, T, 1, 1)).all()  # frame order kept
    red = clip[:, 0, 0]
    flipped = red[:, :, 0].mean(1) > red[:, :, -1].mean(1)
    assert 0 < flipped.sum() < 16  # some clips flipped, some not (p = 0.5; 16 clips, seeded)
    width = (red.max(axis=(1, 2)) - red.min(axis=(1, 2))) / 255
    height = (clip[:, 0, 1].max(axis=(1, 2)) - clip[:, 0, 1].min(axis=(1, 2))) / 255
    assert (width * height > 0.4 * 0.85).all()  # area ≥ 0.4, less the pixel-centre shrink of the code ramp
    lw = (local[:, :, :, 0].max(axis=(3, 4)) - local[:, :, :, 0].min(axis=(3, 4))) / 255
    lh = (local[:, :, :, 1].max(axis=(3, 4)) - local[:, :, :, 1].min(axis=(3, 4))) / 255
    assert (lw * lh < 0.4).all()
    assert not (local[:, 1:, :, :2] == local[:, :1, :, :2]).all(axis=(2, 3, 4, 5)).any()  # per-frame crops


def test_colours_drawn_per_frame() -> None:
    same = np.repeat(coded_clip(48, 64, 1), T, axis=0)  # T identical frames
    off = ClipViews(G, S, L, seed=2, **NO_COLOUR)(batch_of([same] * 4))["clip"]
    assert (off == off[:, :1]).all()
    on = ClipViews(G, S, L, seed=2, jitter_p=1.0, gray_p=0.0, blur_p=(0.0, 0.0))(batch_of([same] * 4))["clip"]
    means = on.reshape(4, T, -1).mean(axis=2)
    assert (np.ptp(means, axis=1) > 0).all()  # each clip's frames got different jitter


def test_invalid_rows_are_zeros() -> None:
    clips = [coded_clip(48, 64), coded_clip(48, 64), coded_clip(48, 64, t=T + 1)]
    out = ClipViews(G, S, L, frames=T, seed=3)(batch_of(clips, ok=[True, False, True], ragged=True))
    assert out["valid"].tolist() == [True, False, False]  # not ok; ok but the wrong clip length
    assert not out["clip"][1:].any() and not out["locals"][1:].any()
    none = ClipViews(G, S, L, seed=3)(batch_of([np.zeros((0,), np.uint8)] * 2, ok=[False, False], ragged=True))
    assert none["clip"].shape == (2, 1, 3, G, G) and not none["valid"].any()


@pytest.mark.parametrize("local_crops", [0, L])
def test_ragged_frame_sizes(local_crops: int) -> None:
    clips = [coded_clip(48, 64), coded_clip(90, 40), coded_clip(20, 200)]
    out = ClipViews(G, S, local_crops, seed=4, **NO_COLOUR)(batch_of(clips, ragged=True))
    assert out["valid"].all() and out["clip"].shape == (3, T, 3, G, G)
    assert out["locals"].shape == (3, T, local_crops, 3, S, S)
    assert (out["clip"][:, :, :2] == out["clip"][:, :1, :2]).all()
