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
    logger.close(timeout=60)
    assert logger.dropped >= 1
    assert any("MLflow unavailable" in r.message for r in caplog.records)
