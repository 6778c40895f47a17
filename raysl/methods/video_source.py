"""Video as a method's data source: video files (decoded into clips by Ray Data CPU tasks) or clip shards made by
`raysl data shard VIDEO_DIR DST --clips`.

A video corpus is handed to the training workers as a list of clip ids (`file#start`), so each worker's epoch is
its own part of a seeded clip order and resumes mid-epoch exactly, as a list of image shards does
(raysl.train.stream). Clip shards are plain files and are split like image shards. Rows: `frames` (uint8
(T, h, w, 3)), `key`, `ok`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import ray.data

from raysl.config import PretrainConfig
from raysl.data.sources import VIDEO_SUFFIXES, Listing, list_source
from raysl.data.video import is_clip_shards, plan_clips, read_clip_shards, read_clips
from raysl.methods.base import Method
from raysl.storage import S3Settings, redact


def is_video(listing: Listing | None, s3: S3Settings | None = None) -> bool:
    """Whether a listed corpus is video: video files, or clip shards."""
    return listing is not None and (listing.fmt == "video" or is_clip_shards(listing, s3))


def given_listing(uri: str, files: list[str]) -> Listing:
    """A listing of a worker's own part of an epoch, told from the entries themselves, so that no epoch lists the
    data URI again: clip ids (`video#start`) are video; other files keep the format of their suffix."""
    if all(f.rpartition("#")[0].lower().endswith(VIDEO_SUFFIXES) for f in files):
        return Listing(uri, "video", tuple(files))
    fmt = "parquet" if files[0].endswith(".parquet") else "webdataset" if files[0].endswith(".tar") else "images"
    return Listing(uri, fmt, tuple(files))


def frame_side(cfg: PretrainConfig) -> int:
    return cfg.data.frame_side or 2 * cfg.model.image_size


class VideoSource(Method):
    """A method that reads video: clips when the data is video; images otherwise, unless `video_only`."""

    #: the method cannot learn from still images (DoRA tracks objects across a clip's frames)
    video_only: ClassVar[bool] = False
    epoch_spans = False  # clips carry no source path (raysl.train.span): one execution per epoch

    @classmethod
    def check_source(cls, cfg: PretrainConfig, s3: S3Settings, listing: Listing | None = None) -> Listing | None:
        d = cfg.data
        listing = listing if listing is not None else list_source(d.uri, d.format, s3)
        if is_video(listing, s3):
            return listing
        if cls.video_only:
            raise ValueError(f"method {cfg.method.name!r} learns from video, but data {redact(d.uri)!r} holds "
                             f"{listing.fmt} data; point data.uri at video files (.mp4, .webm, .mkv) or clip "
                             "shards (`raysl data shard VIDEO_DIR DST --clips`)")
        return super().check_source(cfg, s3, listing)

    @classmethod
    def source_files(cls, cfg: PretrainConfig, s3: S3Settings, listing: Listing | None = None) -> list[str] | None:
        d = cfg.data
        listing = listing if listing is not None else list_source(d.uri, d.format, s3)
        if listing.fmt == "video":
            return plan_clips(list(listing.files), listing.uri, s3, d.frames_per_clip, d.frame_stride,
                              d.clip_every or d.frame_stride)
        return super().source_files(cfg, s3, listing)

    @classmethod
    def open_source(cls, cfg: PretrainConfig, s3: S3Settings, files: list[str] | None = None,
                    listing: Listing | None = None, *, paths: bool = False, read_tasks: int | None = None,
                    ) -> tuple[ray.data.Dataset, dict[str, int]]:
        d = cfg.data
        if listing is None:
            listing = given_listing(d.uri, files) if files else list_source(d.uri, d.format, s3)
        if listing.fmt == "video":
            clips = files if files is not None else cls.source_files(cfg, s3, listing) or []
            ds = read_clips(clips, listing.uri, s3, d.frames_per_clip, d.frame_stride, frame_side(cfg))
        elif is_clip_shards(listing, s3):
            ds = read_clip_shards(files if files is not None else list(listing.files), listing.uri, s3)
        else:
            return super().open_source(cfg, s3, files, listing, paths=paths, read_tasks=read_tasks)
        if d.limit:
            ds = ds.limit(d.limit)
        counts: dict[str, Any] = {}
        return ds, counts
