"""DoRA's views of a video clip (arXiv 2310.08584; settings in docs/DORA-NOTES.md, section 2), as a Ray Data batch
transform on CPU workers.

Rows: `frames` (uint8 (T, h, w, 3); the column is a 5-D array, or an object array of 4-D arrays whose frame sizes
differ between rows), `key`, `ok`. Out: `clip` uint8 (B, T, 3, G, G) and `locals` uint8 (B, T, L, 3, S, S), plus
`valid` and `key` (raysl.data.views' convention: a bad row is zeros with valid=False).

The global view's geometry (one random resized crop, one flip) is drawn once per clip and shared by its frames,
so a patch position means the same place in every frame and the teacher's tracking across frames is meaningful;
colour jitter, grayscale and blur are drawn per frame, as the authors do. Local crops are drawn per frame
independently, each with its own flip and colours. Resampling as the authors' code: bilinear for the clip's crop
(a video tensor crop there), bicubic for the local crops.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from PIL import Image

from raysl.data.augment import ViewSpec, augment_uint8, sample_crops
from raysl.data.views import _finish

log = logging.getLogger(__name__)


def _crop(img: Image.Image, box: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    """A crop box (x0, y0, w, h) of a frame resized to size² (PIL antialiases when it shrinks) → uint8
    (3, size, size)."""
    x0, y0, w, h = (int(v) for v in box)
    return np.asarray(img.resize((size, size), resample, box=(x0, y0, x0 + w, y0 + h))).transpose(2, 0, 1)


class ClipViews:
    """Per clip: T global views sharing one crop and flip (per-frame colours) and T·L independent local crops.

    `blur_p`: (global, local). `frames`: the clip length T every valid row must have (unset: the first row's
    that is ok). `seed`: for tests; unset, each task's views differ.
    """

    def __init__(self, global_size: int, local_size: int, local_crops: int, *,
                 global_scale: tuple[float, float] = (0.4, 1.0), local_scale: tuple[float, float] = (0.05, 0.4),
                 flip_p: float = 0.5, jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
                 jitter_p: float = 0.8, gray_p: float = 0.2, blur_p: tuple[float, float] = (0.1, 0.5),
                 frames: int | None = None, seed: int | None = None) -> None:
        if local_crops < 0:
            raise ValueError(f"local_crops must be >= 0, got {local_crops}")
        self.local_crops, self.frames, self.flip_p = local_crops, frames, flip_p
        # The global flip is drawn per clip here, so the spec the frames share has none.
        self.global_spec = ViewSpec(global_size, global_scale, flip_p=0.0, jitter=jitter, jitter_p=jitter_p,
                                    gray_p=gray_p, blur_p=blur_p[0])
        self.local_spec = ViewSpec(local_size, local_scale, flip_p=flip_p, jitter=jitter, jitter_p=jitter_p,
                                   gray_p=gray_p, blur_p=blur_p[1])
        self.rng, self.seed = np.random.default_rng(seed), seed

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unseeded, a copy unpickled in a Ray task draws afresh (see raysl.data.views: every task would otherwise
        # repeat the pickled generator's draws); seeded, it keeps them (reproducible tests).
        self.__dict__.update(state)
        if self.seed is None:
            self.rng = np.random.default_rng()

    def _clip_length(self, column: np.ndarray, rows: list[np.ndarray], ok: np.ndarray) -> int:
        if self.frames is not None:
            return self.frames
        if column.dtype != object and column.ndim == 5:
            return int(column.shape[1])
        for i in np.flatnonzero(ok):
            if np.ndim(rows[i]) == 4:
                return int(np.shape(rows[i])[0])
        return 1  # no usable row: the batch is all zeros (pass `frames` so such a batch has the others' shape)

    def _usable(self, frames: np.ndarray, t: int, key: str) -> bool:
        """Whether an ok row holds T RGB uint8 frames of a non-zero size; a row that does not is logged."""
        shape = np.shape(frames)
        good = (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and len(shape) == 4
                and shape[0] == t and shape[3] == 3 and shape[1] > 0 and shape[2] > 0)
        if not good:
            log.warning("skipping clip %s: frames %s %s, expected uint8 (%d, h, w, 3)", key, shape,
                        getattr(frames, "dtype", type(frames).__name__), t)
        return good

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch.set_num_threads(1)  # Ray Data runs one task per CPU; torch's own threads would oversubscribe them
        column = batch["frames"]
        n = len(batch["key"])
        rows = [column[i] for i in range(n)]
        ok = np.asarray(batch["ok"], dtype=bool).reshape(n)
        t = self._clip_length(column, rows, ok)
        g, s, num_local = self.global_spec.size, self.local_spec.size, self.local_crops
        clip = np.zeros((n, t, 3, g, g), dtype=np.uint8)
        local = np.zeros((n, t, num_local, 3, s, s), dtype=np.uint8)
        valid = np.array([bool(ok[i]) and self._usable(rows[i], t, str(batch["key"][i])) for i in range(n)],
                         dtype=bool)
        gs, ls = self.global_spec, self.local_spec
        for i in np.flatnonzero(valid):
            frames = rows[i]
            height, width = frames.shape[1:3]
            box = sample_crops(np.array([width]), np.array([height]), gs.scale, gs.ratio, self.rng)[0]
            boxes = sample_crops(np.full(t * num_local, width), np.full(t * num_local, height), ls.scale, ls.ratio,
                                 self.rng).reshape(t, num_local, 4)
            for f in range(t):
                img = Image.fromarray(np.ascontiguousarray(frames[f]))  # a copy of the frame: made once for all crops
                clip[i, f] = _crop(img, box, g, Image.Resampling.BILINEAR)
                for j in range(num_local):
                    local[i, f, j] = _crop(img, boxes[f, j], s, Image.Resampling.BICUBIC)
            if self.rng.random() < self.flip_p:
                clip[i] = clip[i, ..., ::-1].copy()
        if valid.any():
            # Photometric augmentation as batches of images, one draw per frame (global) or per crop (local).
            rows_ok = torch.from_numpy(np.flatnonzero(valid))
            views = torch.from_numpy(clip)
            views[rows_ok] = augment_uint8(views[rows_ok].reshape(-1, 3, g, g), self.global_spec,
                                           self.rng).reshape(-1, t, 3, g, g)
            if num_local:
                crops = torch.from_numpy(local)
                crops[rows_ok] = augment_uint8(crops[rows_ok].reshape(-1, 3, s, s), self.local_spec,
                                               self.rng).reshape(-1, t, num_local, 3, s, s)
        return _finish({"clip": clip, "locals": local}, valid, batch)
