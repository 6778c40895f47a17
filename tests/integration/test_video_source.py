"""Video as a data source on real Ray Data and a real S3 endpoint (moto over HTTP): clip ids → `read_clips` rows in
order, every frame read back by the index painted into it, a truncated file's tail marked bad; the same from S3;
and `raysl data shard --clips` → Parquet clip shards that `read_clip_shards` reads to the same frames."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import raysl.data.video
from raysl.cli import main as cli
from raysl.data.sources import list_source
from raysl.data.synthetic_video import frame_index, make_video, stamp_bits, truncate
from raysl.data.video import is_clip_shards, plan_clips, read_clip_shards, read_clips
from raysl.data.video_decode import decode_clips, parse_clip_id

from .conftest import S3

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
FRAMES = 240


@pytest.fixture(scope="module")
def video_dir(workspace: Path) -> Path:
    root = workspace / "videos"
    make_video(root / "land.mp4", frames=FRAMES, size=(160, 120), stamp_index=True)
    make_video(root / "port.mp4", frames=FRAMES, size=(120, 160), seed=1, stamp_index=True)
    shutil.copy(root / "land.mp4", workspace / "whole.mp4")
    truncate(workspace / "whole.mp4", 0.6).rename(root / "cut.mp4")
    return root


def _check(rows: list[dict], ids: list[str], t: int, stride: int) -> dict[str, bool]:
    """Rows come in the order of the ids; every good clip holds frames start + j·stride. → {id: ok}."""
    assert [r["key"] for r in rows] == ids
    for r in rows:
        if r["ok"]:
            start = parse_clip_id(r["key"])[1]
            assert [frame_index(f, stamp_bits(FRAMES)) for f in r["frames"]] == [start + j * stride
                                                                               for j in range(t)], r["key"]
    return {r["key"]: bool(r["ok"]) for r in rows}


def test_read_clips_in_order_from_local_files_and_from_s3(video_dir: Path, s3: S3, ray_cluster: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    listing = list_source(str(video_dir))
    assert listing.fmt == "video" and len(listing.files) == 3
    ids = plan_clips(list(listing.files), str(video_dir), None, 8, 6, 9)
    order = [ids[i] for i in np.random.default_rng(0).permutation(len(ids))]  # files interleaved
    rows = list(read_clips(order, str(video_dir), None, 8, 6, 40, per_task=5).iter_rows())
    ok = _check(rows, order, 8, 6)
    shapes = {parse_clip_id(r["key"])[0].rsplit("/", 1)[1]: r["frames"].shape for r in rows}
    assert shapes == {"land.mp4": (8, 40, 54, 3), "port.mp4": (8, 54, 40, 3), "cut.mp4": (8, 40, 54, 3)}
    by_file = {name: [ok[k] for k in ids if k.split("#")[0].endswith(name)] for name in shapes}  # start order
    assert all(by_file["land.mp4"]) and all(by_file["port.mp4"])
    cut = by_file["cut.mp4"]  # the clips before the cut, then the rest marked bad
    assert cut[0] and 0 < cut.count(False) < len(cut) and cut == sorted(cut, reverse=True)

    s3.client().upload_file(str(video_dir / "land.mp4"), s3.bucket, "videos/land.mp4")
    s3.client().put_object(Bucket=s3.bucket, Key="videos/noise.mp4", Body=np.random.default_rng(0).bytes(3000))
    uri = f"s3://{s3.bucket}/videos"
    remote = list_source(uri)
    assert remote.fmt == "video" and remote.files == (f"{s3.bucket}/videos/land.mp4", f"{s3.bucket}/videos/noise.mp4")
    monkeypatch.setattr(raysl.data.video, "RAY_PROBE_FILES", 1)  # opened by Ray tasks, one file each
    monkeypatch.setattr(raysl.data.video, "PROBE_TASK_FILES", 1)
    ids = plan_clips(list(remote.files), uri, None, 4, 20, 30)  # the noise yields no clips
    assert ids == [f"{s3.bucket}/videos/land.mp4#{s}" for s in range(0, FRAMES - 60, 30)]
    monkeypatch.setattr(raysl.data.video, "MAX_TASKS", 2)  # 6 clips in 2 tasks, each decoding batches of 2
    ds = read_clips(ids, uri, None, 4, 20, 48, per_task=2)
    # Ray Data joins a task's batches into blocks of up to target_max_block_size (128 MiB), which bounds its memory
    assert [len(b["key"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy")] == [3, 3]
    assert all(_check(list(ds.iter_rows()), ids, 4, 20).values())


def test_clip_shards_read_back_to_the_decoded_clips(video_dir: Path, workspace: Path, ray_cluster: None) -> None:
    dst = workspace / "clip-shards"
    assert cli(["data", "shard", str(video_dir), str(dst), "--clips", "--frames-per-clip", "4", "--frame-stride",
                "10", "--clip-every", "20", "--frame-side", "48", "--rows-per-shard", "8"]) == 0
    manifest = json.loads((dst / "manifest.json").read_text())
    ids = plan_clips([str(video_dir / n) for n in ("cut.mp4", "land.mp4", "port.mp4")], str(video_dir), None, 4,
                     10, 20)
    decoded = decode_clips(ids, pafs.LocalFileSystem(), 4, 10, 48)  # the same clips, decoded here
    good = {k.rsplit("/", 1)[1]: f for k, f, ok in zip(decoded["key"], decoded["frames"], decoded["ok"],
                                                       strict=True) if ok}
    assert manifest["count"] == len(good) and manifest["bad"] == len(ids) - len(good) > 0
    assert manifest["clips"] == {"frames_per_clip": 4, "frame_stride": 10, "clip_every": 20, "frame_side": 48}

    listing = list_source(str(dst))
    assert listing.fmt == "parquet" and is_clip_shards(listing)
    rows = list(read_clip_shards(list(listing.files), str(dst), None).iter_rows())
    assert sorted(r["key"] for r in rows) == sorted(good) and all(r["ok"] for r in rows)
    for r in rows:
        assert r["frames"].shape == good[r["key"]].shape
        assert np.abs(r["frames"].astype(np.int16) - good[r["key"]]).mean() < 6  # JPEG q90 of small grainy frames
        start = parse_clip_id(r["key"])[1]
        assert [frame_index(f, stamp_bits(FRAMES)) for f in r["frames"]] == [start + 10 * j for j in range(4)]

    images = workspace / "image-parquet"
    images.mkdir()
    pq.write_table(pa.table({"image": pa.array([b"\xff"]), "key": pa.array(["a"])}), images / "a.parquet")
    assert not is_clip_shards(list_source(str(images)))
