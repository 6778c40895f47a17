"""DoRA end to end on real parts: generated mp4s on S3 (moto over HTTP), one of them truncated → clips decoded by
Ray Data (PyAV) → 2-worker DoRA on Ray Train, checkpointing to S3 → MLflow server → registered teacher encoder that
loads by alias and tracks objects. The truncated video's clips past the cut are counted as bad, not fatal."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from raysl import tracking
from raysl.config import parse_config
from raysl.data.synthetic_video import make_video, truncate
from raysl.methods.dora_track import last_block_parts
from raysl.train.launch import pretrain

from .conftest import S3

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_dora_on_s3_video_registers_a_tracking_encoder(s3: S3, mlflow_server: str, ray_cluster: None,
                                                       workspace: Path) -> None:
    folder = workspace / "dora-video"
    folder.mkdir()
    for i in range(2):
        make_video(folder / f"walk-{i}.mp4", frames=120, size=(96, 72), objects=3, seed=i)
    truncate(folder / "walk-1.mp4", 0.6)  # a third file: the first 60% of walk-1's bytes
    client = s3.client()
    for p in sorted(folder.glob("*.mp4")):
        client.upload_file(str(p), s3.bucket, f"video/{p.name}")

    cfg = parse_config({
        "data": {"uri": f"s3://{s3.bucket}/video/", "frames_per_clip": 3, "frame_stride": 4, "clip_every": 6,
                 "max_bad_fraction": 0.5},
        "model": {"backbone": "vit_tiny_patch16_224", "image_size": 32, "patch_size": 8,
                  "backbone_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 3},
                  "mean": [0.5] * 3, "std": [0.5] * 3},
        "method": {"name": "dora", "out_dim": 128, "hidden_dim": 64, "bottleneck_dim": 32, "local_crops": 2,
                   "local_size": 16, "objects": 3},
        "optim": {"name": "adamw", "lr": 5e-4, "scale_lr": False, "weight_decay": 0.04, "warmup_steps": 2},
        "train": {"steps": 8, "batch_size": 8, "num_workers": 2, "log_every": 4, "checkpoint_every": 4,
                  "storage_path": f"s3://{s3.bucket}/runs", "torch_threads": 1},
        "tracking": {"tracking_uri": mlflow_server, "experiment": "it-dora", "register_as": "it-dora-encoder"},
    })
    result = pretrain(cfg)
    assert result.model_version == "1"

    from mlflow.tracking import MlflowClient

    client_ml = MlflowClient(mlflow_server)
    run = client_ml.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert math.isfinite(m["loss"]) and 0 < m["loss"] < 2 * math.log(128)
    assert 0 < m["mask_fraction"] <= 1 and "teacher_entropy" in m and "teacher_momentum" in m
    assert m["bad_images"] > 0 and m["bad_fraction"] < 0.5  # walk-1-cut: clips past the cut, counted
    assert any(k.endswith("state.pt") for k in s3.keys(f"runs/{result.run_name}/"))

    encoder, spec, _ = tracking.load_encoder("models:/it-dora-encoder@candidate", mlflow_server)
    assert spec["method"] == "dora" and spec["image_size"] == 32
    parts = last_block_parts(encoder, torch.zeros(2, 3, 32, 32))
    assert parts.cls_attn.shape == (2, 3, 16) and parts.tokens.shape == (2, 16, 48)
