"""Video as a data source, without Ray: real PyAV on real files. Clip planning from container metadata, the
per-batch clip decoder (every frame is read back by the index painted into it), damaged files, the video format
in listings, the `raysl data shard --clips` flags, and the synthetic videos themselves."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import av
import numpy as np
import pyarrow.fs as pafs
import pytest

from raysl import cli
from raysl.data import sources
from raysl.data.synthetic_video import frame_index, make_video, stamp_bits, truncate
from raysl.data.video import BATCH_BYTES, VIDEO_SUFFIXES, clips_per_task, plan_clips, probe
from raysl.data.video_decode import decode_clips, output_size, parse_clip_id
from raysl.storage import StorageError

FS = pafs.LocalFileSystem()
T = 8
LAND = 360  # frames of the landscape video


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Frame-stamped videos: 360 frames landscape (GOP 30) and 120 frames portrait, both x264 with B-frames."""
    root = tmp_path_factory.mktemp("videos")
    make_video(root / "land.mp4", frames=LAND, size=(160, 120), gop=30, stamp_index=True)
    make_video(root / "port.mp4", frames=120, size=(120, 160), gop=30, seed=1, stamp_index=True)
    return root


def _indices(clip: np.ndarray, frames: int) -> list[int]:
    return [frame_index(f, stamp_bits(frames)) for f in clip]


def _decode_all(ids: list[str], stride: int, side: int, t: int = T) -> dict[str, tuple[np.ndarray, bool]]:
    """Every clip, decoded in batches of 8 in a shuffled order (as a training epoch asks for them)."""
    order = [ids[i] for i in np.random.default_rng(0).permutation(len(ids))]
    out = {}
    for i in range(0, len(order), 8):
        batch = decode_clips(order[i:i + 8], FS, t, stride, side)
        assert list(batch["key"]) == order[i:i + 8]  # rows in the order asked
        out.update({k: (f, bool(ok)) for k, f, ok in zip(batch["key"], batch["frames"], batch["ok"], strict=True)})
    return out


@pytest.mark.parametrize("stride", [1, 7, 33])  # 33 > GOP 30: every frame seeks to its own keyframe
def test_clips_hold_the_strided_frames_at_the_asked_short_side(videos: Path, stride: int) -> None:
    land = str(videos / "land.mp4")
    ids = plan_clips([land], str(videos), None, T, stride, 13)
    starts = [parse_clip_id(c)[1] for c in ids]
    assert starts == list(range(0, LAND - 7 * stride, 13)) and starts  # the last clip ends before LAND
    clips = _decode_all(ids, stride, 64)
    for clip_id, (frames, ok) in clips.items():
        start = parse_clip_id(clip_id)[1]
        assert ok and frames.shape == (T, 64, 86, 3) and frames.dtype == np.uint8  # 160×120 → 86×64
        assert _indices(frames, LAND) == [start + j * stride for j in range(T)], clip_id


def test_mixed_shapes_and_portrait_keep_their_aspect(videos: Path) -> None:
    ids = plan_clips([str(videos / "land.mp4"), str(videos / "port.mp4")], str(videos), None, T, 10, 40)
    batch = decode_clips(ids, FS, T, 10, 48)
    shapes = {parse_clip_id(k)[0].rsplit("/", 1)[1]: f.shape for k, f in zip(batch["key"], batch["frames"],
                                                                             strict=True)}
    assert shapes == {"land.mp4": (T, 48, 64, 3), "port.mp4": (T, 64, 48, 3)}
    assert batch["frames"].dtype == object and batch["ok"].all()  # a ragged column: one array per clip
    assert output_size(3840, 2160, 448) == (796, 448) and output_size(1080, 1920, 448) == (448, 796)


def test_a_task_holds_a_few_clips_of_large_frames_and_more_of_small_ones() -> None:
    assert clips_per_task(8, 448) == 7  # DoRA: 8 frames at 448×796, ~8.6 MB a clip
    assert 7 * 8 * 448 * 796 * 3 <= BATCH_BYTES
    assert clips_per_task(8, 224) == 16 and clips_per_task(8, 2048) == 1  # capped: time grows with the source


def test_a_truncated_file_gives_the_clips_before_the_cut_and_marks_the_rest(
        videos: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shutil.copy(videos / "land.mp4", tmp_path / "land.mp4")
    cut = truncate(tmp_path / "land.mp4", 0.6)  # faststart: the index survives, the tail's packets do not
    with av.open(str(cut)) as c:  # how far a plain sequential decode gets
        decodable = 0
        try:
            for _ in c.decode(video=0):
                decodable += 1
        except av.error.FFmpegError:
            pass
    assert 0 < decodable < LAND
    ids = plan_clips([str(cut)], str(tmp_path), None, T, 5, 5)
    assert len(ids) == len(range(0, LAND - 35, 5))  # the header still says LAND frames
    with caplog.at_level(logging.WARNING, logger="raysl.data.video_decode"):
        clips = _decode_all(ids, 5, 32)
    ok = {parse_clip_id(k)[1]: v[1] for k, v in clips.items()}
    last = {s: s + 7 * 5 for s in ok}
    assert all(ok[s] for s in ok if last[s] < decodable - 8)  # a margin: B-frame reordering near the cut
    assert not any(ok[s] for s in ok if last[s] >= decodable)
    bad = [k for k, v in clips.items() if not v[1]]
    assert 0 < len(bad) < len(ids)
    assert all(not clips[k][0].any() and clips[k][0].shape == (T, 32, 42, 3) for k in bad)  # zeros, its shape
    for k, (frames, good) in clips.items():
        if good:
            assert _indices(frames, LAND) == [parse_clip_id(k)[1] + 5 * j for j in range(T)]
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "could not be decoded" in logged and cut.name in logged
    counted = sum(int(r.getMessage().split(" of ")[0]) for r in caplog.records if "could not be decoded" in
                  r.getMessage())
    assert counted == len(bad)


def test_unreadable_files_yield_no_clips_and_all_bad_fails_naming_the_uri(
        videos: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    bad = [str(tmp_path / "empty.mp4"), str(tmp_path / "garbage.mp4")]
    with caplog.at_level(logging.WARNING, logger="raysl.data.video"):
        ids = plan_clips([str(videos / "port.mp4"), *bad], str(tmp_path), None, T, 10, 10)
    assert {parse_clip_id(c)[0] for c in ids} == {str(videos / "port.mp4")}
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "empty.mp4" in logged and "garbage.mp4" in logged and "2 of 3" in logged
    with pytest.raises(StorageError, match=f"none of the 2 video file.*{tmp_path}"):
        plan_clips(bad, str(tmp_path), None, T, 10, 10)
    with pytest.raises(ValueError, match="long enough"):
        plan_clips([str(videos / "port.mp4")], str(videos), None, T, 60, 60)  # needs 421 frames, has 120
    batch = decode_clips([f"{bad[1]}#0", f"{videos / 'port.mp4'}#0"], FS, T, 10, 24)
    assert batch["ok"].tolist() == [False, True]
    assert batch["frames"][0].shape == (T, 24, 24, 3) and not batch["frames"][0].any()  # shape unknown: square


def test_a_container_without_a_frame_count_is_counted_and_mapped_by_pts(tmp_path: Path) -> None:
    path = tmp_path / "clip.mkv"  # Matroska stores no frame count, and its time base is 1 ms (not 1/fps)
    make_video(path, frames=90, size=(96, 64), stamp_index=True)
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0
    assert probe(FS, str(path)) == (90, 30.0)
    ids = plan_clips([str(path)], str(tmp_path), None, 4, 11, 9)
    assert len(ids) == len(range(0, 90 - 33, 9))
    for k, (frames, ok) in _decode_all(ids, 11, 32, t=4).items():
        assert ok and _indices(frames, 90) == [parse_clip_id(k)[1] + 11 * j for j in range(4)]


def test_a_video_folder_is_listed_as_video(videos: Path, tmp_path: Path) -> None:
    assert "video" in sources.FORMATS and sources.VIDEO_SUFFIXES == VIDEO_SUFFIXES
    listing = sources.list_source(str(videos))  # beside the videos: their .masks.npz files
    assert listing.fmt == "video"
    assert sources.data_files(listing) == [str(videos / "land.mp4"), str(videos / "port.mp4")]
    assert sources.source_columns(listing) == {"frames", "key", "ok"}
    assert sources.detect_format(["a/b.MKV", "a/notes.txt"]) == "video"
    assert sources.detect_format(["a/b.mp4", "a/c.jpg"]) == "images"  # images win in a mixed folder
    with pytest.raises(ValueError, match="read as clips"):
        sources.read_images(listing)
    with pytest.raises(ValueError, match="not one of.*'video'"):
        sources.list_source(str(videos), "videos")


def test_shard_clip_flags_are_checked_before_ray_starts(videos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import raysl.train.launch

    def refuse() -> None:
        raise AssertionError("a bad flag must be refused before Ray starts")

    monkeypatch.setattr(raysl.train.launch, "init_ray", refuse)
    dst = str(tmp_path / "out")
    for flags, error in ((["--clips", "--format", "webdataset"], "--clips writes Parquet clip shards only"),
                         (["--format", "parquet", "--frame-stride", "4"], "--frame-stride applies to --clips only"),
                         ([], "--format is required")):
        assert cli.main(["data", "shard", str(videos), dst, *flags]) == 2
        assert error in capsys.readouterr().err


def test_synthetic_video_masks_show_occlusion_and_it_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    masks = make_video(tmp_path / "v.mp4", frames=240, size=(160, 120), objects=3)
    assert time.perf_counter() - start < 5
    assert masks.shape == (240, 3, 120, 160) and masks.dtype == bool
    assert np.array_equal(np.load(f"{tmp_path / 'v.mp4'}.masks.npz")["masks"], masks)
    assert not (masks.sum(axis=1) > 1).any()  # a pixel shows one object at most
    area = masks.sum(axis=(2, 3))
    assert (area > 0).all()  # every object shows in every frame
    # objects pass over each other: at times an object well inside the frame shows less than its whole shape
    occluded = 0
    for f in range(240):
        for i in range(2):  # the front object (2) is never hidden
            ys, xs = np.nonzero(masks[f, i])
            inside = ys.min() > 0 and xs.min() > 0 and ys.max() < 119 and xs.max() < 159
            occluded += bool(inside and area[f, i] < 0.9 * area[:, i].max())
    assert occluded >= 5
    assert (area[:, 2] == area[:, 2].max()).sum() > 0
    with av.open(str(tmp_path / "v.mp4")) as c:
        s = c.streams.video[0]
        assert (s.frames, s.codec_context.width, s.codec_context.height) == (240, 160, 120)
        assert c.format.name.startswith("mov")
    cut = truncate(tmp_path / "v.mp4", 0.5)
    assert cut.stat().st_size == (tmp_path / "v.mp4").stat().st_size // 2
