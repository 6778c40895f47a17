"""URIs fail with the URI named; credentials are redacted; an MLflow outage never blocks or raises."""

import time

import pytest

from raysl import storage
from raysl.config import parse_config
from raysl.metric_logger import MetricLogger
from raysl.storage import StorageError


def test_missing_uri_is_named(tmp_path) -> None:
    with pytest.raises(StorageError, match="nothing-here"):
        storage.list_files(str(tmp_path / "nothing-here"))


def test_empty_folder_is_named(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match="holds no files"):
        storage.list_files(str(tmp_path / "empty"))


def test_redact_strips_url_credentials() -> None:
    assert storage.redact("http://user:s3cr3t@host:9000/x") == "http://***@host:9000/x"
    assert "s3cr3t" not in storage.redact("see postgresql://u:s3cr3t@db/mlflow and more")


def test_pretrain_fails_before_any_worker_on_missing_data(tmp_path, monkeypatch) -> None:
    from raysl.train import launch

    def no_ray(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("Ray was started before the data URI was checked")

    monkeypatch.setattr(launch, "init_ray", no_ray)
    cfg = parse_config({"data": {"uri": str(tmp_path / "nope")}, "train": {"storage_path": str(tmp_path)}})
    with pytest.raises(StorageError, match="nope"):
        launch.pretrain(cfg)


def test_metric_logger_survives_outage(caplog) -> None:
    import socket

    with socket.socket() as s:  # a port on this machine with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logger = MetricLogger(f"http://127.0.0.1:{port}", "0" * 32)
    t0 = time.perf_counter()
    for step in range(50):
        logger.log({"loss": 1.0 / (step + 1)}, step)
    assert time.perf_counter() - t0 < 0.5  # logging never waits for the server
    logger.close(timeout=2)
    assert logger.dropped >= 1
    assert any("MLflow unavailable" in r.message for r in caplog.records)


def test_tracking_warnings_are_redacted(caplog, monkeypatch) -> None:
    import socket

    from raysl import tracking

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the refusal is what is under test, not back-off

    with socket.socket() as s:  # nothing listens here: the client fails at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://alice:tr4ck1ng-pw@127.0.0.1:{port}"
    tracking.log_metrics(uri, "0" * 32, {"loss": 1.0})
    tracking.end_run(uri, "0" * 32)
    lines = [r.getMessage() for r in caplog.records if r.name == "raysl.tracking"]
    assert len(lines) == 2 and all("http://***@127.0.0.1" in line for line in lines)
    assert not any("tr4ck1ng-pw" in line for line in lines)


def test_registered_spec_keeps_its_architecture_and_loses_secrets(monkeypatch) -> None:
    from raysl.tracking import _redacted_spec

    monkeypatch.setenv("TEAM_API_KEY", "team-key-0123456789")
    spec = {"backbone": "resnet10t", "image_size": 32, "backbone_kwargs": {"drop_rate": 0.1}, "mean": [0.5] * 3,
            "data": "s3://AKIA:se/cr@bucket/x", "note": {"by": "team-key-0123456789"}}
    out = _redacted_spec(spec)
    assert {k: out[k] for k in ("backbone", "image_size", "backbone_kwargs", "mean")} == \
        {k: spec[k] for k in ("backbone", "image_size", "backbone_kwargs", "mean")}
    assert out["data"] == "s3://***@bucket/x" and out["note"] == {"by": "***"}


def test_pyfunc_is_code_that_rebuilds_the_encoder(tmp_path) -> None:
    """The file MLflow copies into each registered model: run as MLflow runs it, it sets a PythonModel whose
    predict gives the encoder's embeddings from uint8 images; no pickle is involved."""
    import numpy as np
    import torch
    from mlflow.models.utils import _load_model_code_path
    from mlflow.pyfunc import PythonModel, PythonModelContext

    from raysl.data.views import normalize
    from raysl.models.backbones import create_backbone
    from raysl.models.files import save_encoder_dir
    from raysl.tracking import PYFUNC_CODE

    torch.manual_seed(0)
    enc = create_backbone("resnet10t", image_size=32).eval()
    spec = {"backbone": "resnet10t", "cifar_stem": False, "image_size": 32, "patch_size": None, "backbone_kwargs": {},
            "mean": [0.5] * 3, "std": [0.25] * 3}
    save_encoder_dir(tmp_path, enc, spec)
    model = _load_model_code_path(str(PYFUNC_CODE), None)
    assert isinstance(model, PythonModel)
    model.load_context(PythonModelContext(artifacts={"weights": str(tmp_path / "encoder.safetensors")},
                                          model_config={}))
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    with torch.no_grad():
        expected = enc(normalize(torch.from_numpy(images), spec["mean"], spec["std"])).numpy()
    np.testing.assert_allclose(model.predict(None, images), expected, atol=1e-5)


def test_mlflow_own_output_is_guarded(monkeypatch) -> None:
    import logging
    import os

    from raysl import tracking
    from raysl.storage import RedactingFilter

    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "unset")  # recorded, so the test's change is undone
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")
    tracking._guard("http://127.0.0.1:5000")
    assert "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT" not in os.environ  # a plain URL keeps the links
    tracking._guard("https://bob:pw-123456@mlflow.example")
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"  # MLflow would print the password
    handlers = logging.getLogger("mlflow").handlers
    assert handlers and all(any(isinstance(f, RedactingFilter) for f in h.filters) for h in handlers)
