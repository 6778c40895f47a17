"""Synthetic videos for tests and benchmarks: textured objects moving over a panning textured background.

`make_video` writes an mp4 (PyAV, no system FFmpeg) and its ground truth: per frame, the visible part of every
object after occlusion, saved beside the video as `<path>.masks.npz`. Objects follow smooth Lissajous paths that
cross, so they pass over each other (a fixed depth order decides who occludes whom). `stamp_index` paints the
frame index as a row of black/white blocks along the top, which survives lossy coding and resizing and lets a
test read back exactly which frame a decoder returned (`frame_index`). `truncate` cuts a copy of a file.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

STAMP_ROWS = 8  # the index band is 1/8 of the frame height


def stamp_bits(frames: int) -> int:
    """Blocks in the index band of a video of `frames` frames (at least 8)."""
    return max(8, math.ceil(math.log2(max(frames, 2))))


def frame_index(frame: np.ndarray, bits: int) -> int:
    """The index painted by `make_video(stamp_index=True)` into an RGB frame (any size: the band scales)."""
    h, w = frame.shape[:2]
    band = frame[: max(1, h // STAMP_ROWS)].astype(np.float32).mean(axis=(0, 2))  # mean over rows, channels
    value = 0
    for b in range(bits):  # the middle half of each block: its edges blur under chroma subsampling and scaling
        lo, hi = (4 * b + 1) * w // (4 * bits), (4 * b + 3) * w // (4 * bits)
        value |= int(band[lo:max(hi, lo + 1)].mean() > 127.5) << b
    return value


def _texture(rng: np.random.Generator, h: int, w: int, colour: np.ndarray, grain: float) -> np.ndarray:
    """Smooth multi-scale noise around `colour` (float32 HxWx3): a surface a tracker can hold on to."""
    acc = np.zeros((h, w, 3), np.float32)
    for cells, weight in ((4, 40.0), (12, 25.0)):
        low = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
        up = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC), np.float32)
        acc += weight * (up / 255.0 - 0.5)
    acc += grain * rng.standard_normal((h, w, 1)).astype(np.float32)
    return acc + colour[None, None, :]


def _shapes(rng: np.random.Generator, objects: int, h: int) -> list[tuple[bool, int, np.ndarray]]:
    """Per object: (disc or rectangle, radius, local shape mask of side 2·radius+1)."""
    out = []
    for i in range(objects):
        r = int(h * rng.uniform(0.14, 0.22))
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        disc = i % 2 == 0
        shape = (xx**2 + yy**2 <= r * r) if disc else (np.abs(yy) <= int(r * 0.7)) & (np.abs(xx) <= r)
        out.append((disc, r, shape))
    return out


def _paths(rng: np.random.Generator, objects: int, frames: int, w: int, h: int) -> np.ndarray:
    """(objects, frames, 2) integer centres (x, y) on smooth, crossing paths that stay inside the frame."""
    t = np.arange(frames, dtype=np.float64)[None, :]
    fx, fy = rng.uniform(0.5, 1.5, (2, objects, 1)) * 2 * np.pi / max(frames, 2)
    px, py = rng.uniform(0, 2 * np.pi, (2, objects, 1))
    x = w / 2 + 0.38 * w * np.sin(fx * t + px)
    y = h / 2 + 0.32 * h * np.sin(fy * t + py)
    return np.rint(np.stack([x, y], axis=-1)).astype(np.int64)


def _paste(canvas: np.ndarray, visible: np.ndarray, tex: np.ndarray, shape: np.ndarray, cx: int, cy: int,
           r: int) -> None:
    """Draw one object centred at (cx, cy), clipped to the canvas; mark its pixels in `visible`."""
    h, w = canvas.shape[:2]
    y0, x0 = cy - r, cx - r
    ys, xs = slice(max(0, y0), min(h, y0 + 2 * r + 1)), slice(max(0, x0), min(w, x0 + 2 * r + 1))
    ls = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
    m = shape[ls]
    canvas[ys, xs][m] = tex[ls][m]
    visible[ys, xs] |= m


def scene(frames: int, size: tuple[int, int], objects: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The scene frame by frame: (uint8 (H, W, 3), visible masks bool (objects, H, W)), before coding."""
    w, h = size
    rng = np.random.default_rng(seed)
    pan = 2 * frames // 8 + 8  # the background is wider than the frame and pans slowly (a walking camera)
    background = np.clip(_texture(rng, h, w + pan, rng.uniform(70, 180, 3).astype(np.float32), 6.0), 0, 255)
    palette = np.array([[230, 40, 40], [40, 200, 60], [50, 80, 240], [240, 220, 40], [200, 60, 220],
                        [40, 220, 220], [250, 140, 30], [250, 250, 250]], np.float32)
    shapes = _shapes(rng, objects, h)
    textures = [np.clip(_texture(rng, 2 * r + 1, 2 * r + 1, palette[i % len(palette)], 4.0), 0, 255)
                for i, (_, r, _) in enumerate(shapes)]
    centres = _paths(rng, objects, frames, w, h)
    for f in range(frames):
        off = f * pan // max(frames, 1)
        canvas = background[:, off:off + w].copy()
        drawn = np.zeros((objects, h, w), bool)
        for i in range(objects):  # index order is depth order: a later object passes over an earlier one
            cx, cy = centres[i, f]
            _paste(canvas, drawn[i], textures[i], shapes[i][2], int(cx), int(cy), shapes[i][1])
        masks = np.zeros((objects, h, w), bool)
        front = np.zeros((h, w), bool)
        for i in reversed(range(objects)):  # visible = drawn minus everything in front of it
            masks[i] = drawn[i] & ~front
            front |= drawn[i]
        yield canvas.astype(np.uint8), masks


def stamp(frame: np.ndarray, index: int, bits: int) -> None:
    """Paint `index` as `bits` black/white blocks into the top band of an RGB frame (in place)."""
    h, w = frame.shape[:2]
    cols = np.arange(w) * bits // w  # the block each column belongs to
    frame[: max(1, h // STAMP_ROWS)] = (((index >> cols) & 1) * 255).astype(np.uint8)[None, :, None]


def encode(video: Iterable[np.ndarray], path: Path, *, fps: int = 30, codec: str = "libx264", gop: int = 30,
           crf: int = 18, preset: str = "veryfast") -> None:
    """Write RGB frames (of one even size) as an mp4 (or any container the suffix names) with the index at the
    front (faststart), so a cut copy still opens. Frames are coded as they come: a long video is never held."""
    options = {"movflags": "+faststart"} if path.suffix in (".mp4", ".mov") else {}
    with av.open(str(path), "w", options=options) as out:
        stream: Any = None
        for frame in video:
            if stream is None:
                stream = out.add_stream(codec, rate=fps)
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.codec_context.gop_size = gop
                if codec == "libx264":  # a fixed GOP (no scene-cut keyframes): tests and benches know where they are
                    stream.options = {"preset": preset, "crf": str(crf), "x264-params": f"scenecut=0:keyint={gop}"}
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        if stream is not None:
            out.mux(stream.encode())  # flush the encoder's delayed frames


def make_video(path: str | Path, *, frames: int = 240, size: tuple[int, int] = (160, 120), objects: int = 3,
               fps: int = 30, seed: int = 0, codec: str = "libx264", gop: int = 30,
               stamp_index: bool = False) -> np.ndarray:
    """Write a `frames`-frame video of `size` (width, height; even) at `path` and its visible object masks
    (frames, objects, H, W) bool to `<path>.masks.npz` (key "masks"); return the masks. `stamp_index`: the frame
    index is painted along the top (`frame_index` reads it back) and the masks are cleared under it."""
    path = Path(path)
    if size[0] % 2 or size[1] % 2:
        raise ValueError(f"size {size}: yuv420p needs an even width and height")
    masks = np.zeros((frames, objects, size[1], size[0]), bool)
    bits, band = stamp_bits(frames), max(1, size[1] // STAMP_ROWS)

    def frames_of() -> Iterator[np.ndarray]:
        for f, (frame, visible) in enumerate(scene(frames, size, objects, seed)):
            if stamp_index:
                stamp(frame, f, bits)
                visible[:, :band] = False
            masks[f] = visible
            yield frame

    path.parent.mkdir(parents=True, exist_ok=True)
    encode(frames_of(), path, fps=fps, codec=codec, gop=gop)
    np.savez_compressed(f"{path}.masks.npz", masks=masks)
    return masks


def truncate(path: str | Path, fraction: float) -> Path:
    """A copy of `path` holding only its first `fraction` of bytes, beside it (`<stem>.cut<pct><suffix>`)."""
    src = Path(path)
    data = src.read_bytes()
    out = src.with_name(f"{src.stem}.cut{round(fraction * 100)}{src.suffix}")
    out.write_bytes(data[: int(len(data) * fraction)])
    return out
