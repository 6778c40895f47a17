"""Clips of already-decoded video frames as one image sample per frame, for the image view transforms.

A video source yields rows of `frames` (uint8 (T, h, w, 3)), `ok` (False: the clip could not be decoded) and
`key`. A method that learns from single images (DINO) treats every frame as its own image: the rows expand
T-fold, each frame keyed `{key}/{t}`, and a clip that did not decode gives rows that are invalid (counted by
the training worker like an image that does not decode), never zeros that look like data.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

PASSTHROUGH = ("label", "caption")


def _frame_count(frames: object) -> int:
    """Frames in one clip's row; a clip that failed may carry no frame array at all: it still counts as one row,
    so the failure is counted, not lost."""
    shape = getattr(frames, "shape", None)
    if shape is not None and len(shape) == 4 and shape[0] > 0:
        return int(shape[0])
    return 1


class FrameRows:
    """The frames of a batch of clips, one sample per frame: `columns` holds the expanded `key` (and `label` /
    `caption` where present, repeated per frame); `image(i)` is sample i as an RGB PIL image, or None where its
    clip is not ok or the frame is not (h, w, 3) uint8."""

    def __init__(self, batch: dict[str, np.ndarray]) -> None:
        self.frames = batch["frames"]
        self.ok = np.asarray(batch["ok"], dtype=bool)
        counts = np.array([_frame_count(f) for f in self.frames], dtype=np.int64)
        self.clip = np.repeat(np.arange(len(counts)), counts)
        self.t = (np.concatenate([np.arange(c) for c in counts]) if len(counts)
                  else np.zeros(0, dtype=np.int64))
        keys = np.asarray(batch["key"])
        self.columns: dict[str, np.ndarray] = {
            "key": np.array([f"{keys[c]}/{t}" for c, t in zip(self.clip, self.t, strict=True)], dtype=str)}
        for name in PASSTHROUGH:
            if name in batch:
                self.columns[name] = np.asarray(batch[name])[self.clip]

    def __len__(self) -> int:
        return len(self.clip)

    def image(self, i: int) -> Image.Image | None:
        c = int(self.clip[i])
        if not self.ok[c]:
            return None
        frame = np.asarray(self.frames[c])[int(self.t[i])]
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or 0 in frame.shape:
            log.warning("skipping bad frame %s: %s %s, not (h, w, 3) uint8", self.columns["key"][i],
                        frame.dtype, frame.shape)
            return None
        return Image.fromarray(np.ascontiguousarray(frame))
