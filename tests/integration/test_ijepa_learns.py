"""I-JEPA behind the same contract: 2 Ray workers pretrain a ViT on digits, the target encoder is
registered as raysl-ijepa-encoder, and the probe job finds it better than random init."""

from __future__ import annotations

from pathlib import Path

import pytest

from raysl.config import parse_config
from raysl.demo import demo_config, write_digits
from raysl.eval.probe import probe
from raysl.train.launch import pretrain

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_ijepa_pretraining_beats_random_init(mlflow_server: str, ray_cluster: None, workspace: Path) -> None:
    data = write_digits(workspace / "digits-ijepa", shards=2)
    tree = demo_config(data, workspace, steps=60, method="ijepa")
    tree["tracking"] = {"tracking_uri": mlflow_server, "experiment": "it-ijepa"}
    tree["train"]["log_every"] = 20
    cfg = parse_config(tree)
    result = pretrain(cfg)
    assert result.model_name == "raysl-ijepa-encoder" and result.model_version == "1"
    assert 0.0 < result.metrics["context_fraction"] < 1.0
    report = probe("models:/raysl-ijepa-encoder@candidate", str(data["train"]), test_uri=str(data["test"]),
                   tracking_uri=mlflow_server)
    s = report.scores
    assert s["pretrained_linear_top1"] > s["random_init_linear_top1"] + 0.05, s
