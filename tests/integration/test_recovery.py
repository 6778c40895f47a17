"""Nothing is lost: a failed worker resumes from the last checkpoint; a rerun of a stopped run continues it
into the same MLflow run; too many bad images stop the run with a message that names examples; an MLflow
outage does not stop training."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysl.config import PretrainConfig, parse_config
from raysl.demo import write_digits
from raysl.train.launch import pretrain

from .conftest import S3

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def digits(workspace: Path) -> dict[str, Path]:
    return write_digits(workspace / "digits-parquet", shards=2)


def _cfg(data: str, storage: Path, tracking: str, **train: Any) -> PretrainConfig:
    return parse_config({
        "data": {"uri": data},
        "model": {"backbone": "resnet10t", "image_size": 32},
        "method": {"projector_hidden": 128, "predictor_hidden": 128, "projector_dim": 32},
        "optim": {"name": "adamw", "lr": 1e-3, "scale_lr": False, "warmup_steps": 2},
        "train": {"steps": 12, "batch_size": 32, "num_workers": 2, "log_every": 2, "checkpoint_every": 4,
                  "storage_path": str(storage), "torch_threads": 1, **train},
        "tracking": {"tracking_uri": tracking, "experiment": "it-recovery"},
    })


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def test_failed_worker_resumes_from_last_checkpoint(digits: dict[str, Path], mlflow_server: str,
                                                    ray_cluster: None, workspace: Path) -> None:
    cfg = _cfg(str(digits["train"]), workspace / "runs-a", mlflow_server, fault_at_step=7, max_failures=1)
    result = pretrain(cfg)
    assert _history(mlflow_server, result.run_id, "resumed_from_step") == [(4, 4.0)]
    steps = [s for s, _ in _history(mlflow_server, result.run_id, "loss")]
    assert steps[-1] == 12 and 6 in steps  # step 6 ran before the fault, and again after the restart
    assert result.metrics["step"] == 12


def test_rerun_continues_a_stopped_run(digits: dict[str, Path], mlflow_server: str, ray_cluster: None,
                                       workspace: Path) -> None:
    storage = workspace / "runs-b"
    first = _cfg(str(digits["train"]), storage, mlflow_server, fault_at_step=10, max_failures=0, run_name="rerun")
    with pytest.raises(Exception, match="injected fault at step 10"):
        pretrain(first)
    again = _cfg(str(digits["train"]), storage, mlflow_server, max_failures=0, run_name="rerun")
    result = pretrain(again, resume=True)
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(mlflow_server).search_runs(
        [MlflowClient(mlflow_server).get_experiment_by_name("it-recovery").experiment_id],
        filter_string="tags.`raysl.run_name` = 'rerun'")
    assert [r.info.run_id for r in runs] == [result.run_id]  # one MLflow run across both attempts
    assert _history(mlflow_server, result.run_id, "resumed_from_step") == [(8, 8.0)]
    assert _history(mlflow_server, result.run_id, "loss")[-1][0] == 12


def test_too_many_bad_images_stop_with_examples(mlflow_server: str, ray_cluster: None, workspace: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    images, keys = [], []
    for i in range(200):
        if i % 3 == 0:
            images.append(b"\x89PNG\r\n\x1a\n broken")
            keys.append(f"broken-{i:03d}")
        else:
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
            images.append(buf.getvalue())
            keys.append(f"ok-{i:03d}")
    folder = workspace / "bad-parquet"
    folder.mkdir()
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "key": keys}), folder / "part.parquet")
    cfg = _cfg(str(folder), workspace / "runs-c", mlflow_server, max_failures=0)
    cfg.data.max_bad_fraction = 0.1
    with pytest.raises(Exception) as e:
        pretrain(cfg)
    msg = str(e.value)
    assert "could not be decoded" in msg and "max_bad_fraction=0.1" in msg and "broken-" in msg


def test_mlflow_outage_does_not_stop_training(digits: dict[str, Path], ray_cluster: None, workspace: Path,
                                              s3: S3) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    cfg = _cfg(str(digits["train"]), workspace / "runs-d", dead, steps=4, max_failures=0)
    result = pretrain(cfg)
    assert result.metrics["step"] == 4 and result.model_version == "unregistered"
    assert (Path(result.checkpoint_uri) / "encoder.safetensors").exists()
