"""PyAV decoding of strided clips, the work of one Ray Data CPU task (see raysl/data/video.py for the API).

A clip id is `f"{file}#{start}"`; its frames are start + j·stride, j < frames_per_clip. Frame indices are mapped
to presentation times (index / fps), and decoded frames back to indices by their pts, never by counting: counting
drifts after a seek, a dropped frame or a damaged packet. A frame is decoded by seeking to the keyframe at or
before it and decoding forward; a later frame of the same file is reached by decoding on when it is at most
about one GOP ahead (a seek would land on a keyframe behind us and decode the same frames again) and by seeking
when it is further (docs/DORA-NOTES.md §3: seek-per-frame vs one seek + sequential, same cost at stride ≈ GOP).
Frames are converted to RGB at the output size by swscale (`to_ndarray(width=, height=)`), so a 4K frame is
never held at full size as RGB.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import av
import av.container
import numpy as np
import pyarrow.fs as pafs

from raysl.storage import redact

log = logging.getLogger(__name__)

CODEC_THREADS = 1  # Ray runs one task per CPU: decoder threads beyond one would oversubscribe the cores
LOCAL_BUFFER = 256 * 1024
S3_BUFFER = 2 * 1024 * 1024  # PyAV reads in chunks of this; each read of an S3 file is one ranged GET
SHOWN_FAILURES = 3  # clips named per file and batch in the log; the rest are counted


class MissingFrame(Exception):
    """A frame the stream does not hold: past the decodable end (a truncated file), or lost to damage."""


# What a damaged or unreadable file raises (FFmpegError ⊂ ValueError; pyarrow's read errors are OSErrors)
DECODE_ERRORS = (av.error.FFmpegError, OSError, MissingFrame)


def fs_path(file: str) -> str:
    """A path on its filesystem: a URI's scheme, if given, dropped (listings give paths without it)."""
    for scheme in ("s3://", "file://"):
        if file.startswith(scheme):
            return file[len(scheme):]
    return file


def clip_id(file: str, start: int) -> str:
    return f"{file}#{start}"


def parse_clip_id(clip: str) -> tuple[str, int]:
    """(file, start frame) of a clip id; the last "#" splits, so a path may hold "#" itself."""
    file, sep, start = clip.rpartition("#")
    if not sep or not start.isdigit():
        raise ValueError(f"not a clip id (FILE#START): {redact(clip)!r}")
    return file, int(start)


def output_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) with the short side `side` and the aspect kept; the long side rounded to an even number."""
    if width <= 0 or height <= 0:
        return side, side
    scale = side / min(width, height)
    if width <= height:
        return side, max(2, round(height * scale / 2) * 2)
    return max(2, round(width * scale / 2) * 2), side


def open_container(fs: pafs.FileSystem, path: str) -> tuple[Any, av.container.InputContainer]:
    """(the file, its container) through the pyarrow filesystem: a seekable file PyAV reads in large chunks, so
    one S3 GET brings many packets. Close both (`close_container`)."""
    f = fs.open_input_file(path)
    try:
        buffer = S3_BUFFER if isinstance(fs, pafs.S3FileSystem) else LOCAL_BUFFER
        return f, av.open(f, "r", buffer_size=buffer)
    except BaseException:
        f.close()
        raise


def close_container(f: Any, container: av.container.InputContainer) -> None:
    try:
        container.close()
    finally:
        f.close()


def stream_rate(stream: Any) -> Fraction:
    """The stream's frame rate (average, else guessed, else base); an error when none is known."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return Fraction(rate)
    raise MissingFrame("the video stream has no frame rate")


class VideoReader:
    """One open video in a decode task: RGB frames by index at the output size."""

    def __init__(self, fs: pafs.FileSystem, path: str, side: int, slack: int) -> None:
        self._file, self._container = open_container(fs, path)
        try:
            if not self._container.streams.video:
                raise MissingFrame("no video stream")
            self._stream = self._container.streams.video[0]
            self._stream.codec_context.thread_count = CODEC_THREADS
            self._fps = stream_rate(self._stream)
            if self._stream.time_base is None:
                raise MissingFrame("the video stream has no time base")
            self._tb = Fraction(self._stream.time_base)
            self._t0 = self._stream.start_time or 0
        except BaseException:
            self.close()
            raise
        ctx = self._stream.codec_context
        self.width, self.height = output_size(ctx.width, ctx.height, side)
        self._slack = slack  # how far past its index a frame may land (rounding, VFR, a lost frame)
        self._frames: Iterator[Any] | None = None
        self._skip_below = 0  # packets shown before this pts are not wanted: their non-reference frames are skipped
        self._pos = -1  # index of the last frame decoded on the current run
        self._key = -1  # index of the last keyframe seen on this run
        self._gop = 0  # longest keyframe interval seen; 0 until two keyframes were decoded in a row

    def close(self) -> None:
        close_container(self._file, self._container)

    def _index(self, pts: int) -> int:
        return round((pts - self._t0) * self._tb * self._fps)

    def _pts(self, index: int) -> int:
        return self._t0 + int(index / self._fps / self._tb)

    def _decode_on_to(self, index: int) -> bool:
        """Whether decoding on from where we are reaches `index` cheaper than seeking: when no keyframe lies
        between here and there (by the longest keyframe interval seen), a seek would land behind us. Until two
        keyframes were seen in a row the interval is unknown: decode on up to 2 s ahead."""
        if self._frames is None or index <= self._pos:
            return False
        if self._gop and self._key >= 0:
            return index < self._key + self._gop
        return index - self._pos <= 2 * max(1, round(self._fps))

    def _run(self) -> Iterator[Any]:
        """Frames decoded from the current position on. A packet shown before the wanted frame is decoded with
        skip_frame=NONREF: the decoder drops it unless later frames refer to it (most B-frames go; measured on x264
        veryfast 720p, a third less decode time). Packets come in decode order, so the switch is exact."""
        ctx = self._stream.codec_context
        for packet in self._container.demux(self._stream):
            ctx.skip_frame = "NONREF" if packet.pts is not None and packet.pts < self._skip_below else "DEFAULT"
            yield from packet.decode()  # the last, empty packet flushes the frames the decoder still holds

    def frame(self, index: int) -> np.ndarray:
        """Frame `index` as uint8 (height, width, 3). Raises MissingFrame or a decode error (FFmpegError)."""
        if not self._decode_on_to(index):
            # backward + keyframe: the keyframe at or before the target, from which decoding reaches it
            self._container.seek(self._pts(index), stream=self._stream, backward=True, any_frame=False)
            self._frames, self._pos, self._key = self._run(), -1, -1
        assert self._frames is not None
        # half a frame early: a frame whose pts rounds to the target must be decoded, never skipped
        self._skip_below = self._pts(index) - int(Fraction(1, 2) / self._fps / self._tb)
        try:
            for frame in self._frames:
                if frame.pts is None:
                    continue
                i = self._index(frame.pts)
                if frame.key_frame:
                    if self._key >= 0:
                        self._gop = max(self._gop, i - self._key)
                    self._key = i
                self._pos = i
                if i < index:
                    continue
                if i - index > self._slack:
                    raise MissingFrame(f"frame {index} is missing (the next decodable one is {i})")
                out: np.ndarray = frame.to_ndarray(format="rgb24", width=self.width, height=self.height)
                return out
            raise MissingFrame(f"frame {index} is past the decodable end of the stream")
        except BaseException:
            self._frames = None  # the decoder's state is unknown: the next frame seeks
            raise


def _decode_file(fs: pafs.FileSystem, file: str, starts: list[int], t: int, stride: int, side: int,
                 reader: VideoReader | None) -> tuple[dict[int, np.ndarray | None], VideoReader | None]:
    """{start: clip (T, h, w, 3) or None where a frame failed} of one file's clips, decoded in start order with
    frames shared between overlapping clips. `reader`: an open reader of `file` to reuse."""
    clips: dict[int, np.ndarray | None] = {}
    failed: list[str] = []
    if reader is None:
        try:
            reader = VideoReader(fs, file, side, max(1, stride // 2))
        except DECODE_ERRORS as exc:
            log.warning("cannot open video %s (%d clip(s) of it marked bad): %s", redact(file), len(set(starts)),
                        redact(str(exc)))
            return dict.fromkeys(starts), None
    cache: dict[int, np.ndarray] = {}  # frames of earlier clips this batch that later clips also hold
    for start in sorted(set(starts)):
        for i in [i for i in cache if i < start]:  # clips come in start order: nothing later needs these
            del cache[i]
        try:
            for j in range(t):
                idx = start + j * stride
                if idx not in cache:
                    cache[idx] = reader.frame(idx)
            clips[start] = np.stack([cache[start + j * stride] for j in range(t)])
        except DECODE_ERRORS as exc:
            clips[start] = None
            failed.append(f"{clip_id(file, start)}: {exc}")
    if failed:
        shown = "; ".join(redact(f) for f in failed[:SHOWN_FAILURES])
        more = f" (and {len(failed) - SHOWN_FAILURES} more)" if len(failed) > SHOWN_FAILURES else ""
        log.warning("%d of %d clip(s) of %s could not be decoded, marked bad: %s%s", len(failed), len(set(starts)),
                    redact(file), shown, more)
    return clips, reader


class ClipDecoder:
    """Decodes batches of clip ids (`__call__`), keeping the last file's container open between batches: the next
    batch of an unshuffled list continues in the same file. Call `close` when done."""

    def __init__(self, fs: pafs.FileSystem, frames_per_clip: int, frame_stride: int, frame_side: int) -> None:
        self.fs, self.t, self.stride, self.side = fs, frames_per_clip, frame_stride, frame_side
        self._open: tuple[str, VideoReader] | None = None

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def __call__(self, ids: list[str]) -> dict[str, np.ndarray]:
        """{"frames": uint8 (N, T, h, w, 3) (an object array of per-clip arrays when videos of several shapes mix),
        "key": the clip ids, "ok": bool}, in the order of `ids`. The clips of one file share one open container
        and are decoded in start order; a clip with any frame that fails is zeros and ok=False."""
        by_file: dict[str, list[int]] = {}
        for clip in ids:
            file, start = parse_clip_id(clip)
            by_file.setdefault(file, []).append(start)
        kept = self._open
        self._open = None
        if kept is not None and kept[0] not in by_file:
            kept[1].close()
            kept = None
        decoded: dict[tuple[str, int], np.ndarray | None] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        # the kept file first, the rest in order; the last file's reader stays open for the next batch
        order = sorted(by_file, key=lambda f: kept is None or f != kept[0])
        for n, file in enumerate(order):
            reuse = kept[1] if kept is not None and kept[0] == file else None
            clips, reader = _decode_file(self.fs, file, by_file[file], self.t, self.stride, self.side, reuse)
            if reader is not None:
                shapes[file] = (self.t, reader.height, reader.width, 3)
                if n == len(order) - 1:
                    self._open = (file, reader)
                else:
                    reader.close()
            decoded.update(((file, s), c) for s, c in clips.items())
        frames, ok = [], []
        for clip in ids:
            file, start = parse_clip_id(clip)
            arr = decoded[(file, start)]
            ok.append(arr is not None)
            frames.append(arr if arr is not None else
                          np.zeros(shapes.get(file, (self.t, self.side, self.side, 3)), np.uint8))
        return {"frames": stack(frames), "key": np.array(ids, dtype=object), "ok": np.array(ok, dtype=bool)}


def decode_clips(ids: list[str], fs: pafs.FileSystem, frames_per_clip: int, frame_stride: int, frame_side: int,
                 ) -> dict[str, np.ndarray]:
    """One batch of clips decoded on its own (see `ClipDecoder.__call__`)."""
    decoder = ClipDecoder(fs, frames_per_clip, frame_stride, frame_side)
    try:
        return decoder(ids)
    finally:
        decoder.close()


def stack(arrays: list[np.ndarray]) -> np.ndarray:
    """One (N, …) array when the shapes agree, else an object array of them (a variable-shaped tensor column)."""
    if arrays and all(a.shape == arrays[0].shape for a in arrays):
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):  # item by item: numpy would try to broadcast a list of arrays
        out[i] = a
    return out
