"""Detection downstream on real parts: a registered encoder (MLflow server, artifacts on moto S3) → COCO data on
S3 → `raysl finetune --task detection --init both` on 2 Ray workers → two runs logged, both detectors registered
with lineage to the encoder version, COCO mAP tagged, one table printed; and the errors a user meets first."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raysl.cli import main as cli
from raysl.data.synthetic_detection import write_detection_splits
from raysl.models.backbones import create_backbone
from raysl.tracking import client, experiment_id, register_encoder

from .conftest import S3

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def _upload(s3: S3, folder: Path, prefix: str) -> str:
    c = s3.client()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            c.upload_file(str(f), s3.bucket, f"{prefix}/{f.relative_to(folder).as_posix()}")
    return f"s3://{s3.bucket}/{prefix}"


def test_detection_finetune_from_registry_over_s3(s3: S3, mlflow_server: str, ray_cluster: None, workspace: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # A registered encoder; training it is the pretraining tests' business, this test is about the job.
    torch.manual_seed(0)
    spec = {"method": "byol", "backbone": "resnet18", "cifar_stem": False, "image_size": 32, "patch_size": None,
            "backbone_kwargs": {}, "mean": [0.5] * 3, "std": [0.5] * 3}
    mlflow = client(mlflow_server)
    run = mlflow.create_run(experiment_id(mlflow_server, "it-det-source"), run_name="source")
    register_encoder(mlflow_server, run.info.run_id, create_backbone("resnet18", image_size=32), spec,
                     "it-det-encoder", "candidate")

    splits = write_detection_splits(workspace / "det", 48, 16, image_size=64, seed=3)
    train_uri = _upload(s3, splits["train"], "det/train")
    test_uri = _upload(s3, splits["test"], "det/test")
    common = ["finetune", "--task", "detection", "--data", train_uri, "--test-data", test_uri,
              "--storage-path", f"s3://{s3.bucket}/ft-runs"]
    capsys.readouterr()

    # errors a user meets first: an alias or a name that does not exist (the message lists what does)
    assert cli([*common, "--model", "models:/it-det-encoder@champion"]) == 2
    assert cli([*common, "--model", "models:/no-such-encoder@candidate"]) == 2

    assert cli([*common, "--model", "models:/it-det-encoder@candidate", "--init", "both", "--steps", "8",
                "--batch-size", "8", "--image-size", "64", "train.log_every=4", "train.torch_threads=1",
                "method.fpn_channels=64"]) == 0
    out = capsys.readouterr().out
    assert "detection fine-tuning of models:/it-det-encoder@candidate" in out
    assert "pretrained" in out and "random" in out and "difference" in out

    for name, init in (("it-det-fasterrcnn", "pretrained"), ("it-det-fasterrcnn-scratch", "random")):
        mv = mlflow.get_model_version_by_alias(name, "candidate")
        assert mv.tags["raysl.source_model"] == "it-det-encoder" and mv.tags["raysl.source_version"] == "1"
        assert mv.tags["raysl.init"] == init and mv.tags["raysl.task"] == "detection"
        assert 0.0 <= float(mv.tags["map_50"]) <= 1.0 and 0.0 <= float(mv.tags["map"]) <= float(mv.tags["map_50"])
        run_data = mlflow.get_run(mv.run_id).data
        assert run_data.tags["raysl.source_model_uri"] == "models:/it-det-encoder@candidate"
        assert "final_map_50" in run_data.metrics and "data_boxes" in run_data.metrics
        assert [m.step for m in mlflow.get_metric_history(mv.run_id, "loss")] == [4, 8]
    ckpts = s3.keys("ft-runs/")
    assert any(k.endswith("model.safetensors") for k in ckpts) and any("finetune-init/" in k for k in ckpts)
