"""Fault table, MLflow rows. The tracking server is reached through a TCP proxy the test cuts: to the client
that is a stopped server (connections refused). Down for ~30 s mid-run: training never waits for it, the
metrics of the gap arrive once it is back, registration succeeds. Down at registration: the command fails
with a non-zero exit, the run is marked FAILED when the server answers again, and a rerun registers the
finished checkpoint without training again. Down from the start: training completes, registration waits for
a rerun in the same way."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from mlflow.tracking import MlflowClient

from raysl.storage import S3Settings
from raysl.train.errors import RegistrationError
from raysl.train.launch import pretrain
from raysl.train.run_state import read_state, state_uri

from .fault_data import byol_cfg, history, write_poisoned
from .faults import Proxy, local_checkpoints, outage, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def data(workspace: Path) -> Path:
    folder = workspace / "faults-mlflow-data"
    write_poisoned(folder, bad_fraction=0.0)
    return folder


@pytest.fixture
def proxy(mlflow_server: str) -> Proxy:
    p = Proxy(int(urlparse(mlflow_server).port or 80))
    yield p  # type: ignore[misc]
    p.close()


def test_mlflow_gap_mid_run_is_flushed_and_registration_succeeds(data: Path, proxy: Proxy, ray_cluster: None,
                                                                  workspace: Path) -> None:
    storage = workspace / "faults-mlflow-gap"
    cfg = byol_cfg(str(data), str(storage), proxy.url, steps=40, train__run_name="mlflow-gap",
                   tracking__retry_s=90)
    t, cut_at = outage(proxy, 30, lambda: len(local_checkpoints(storage, "mlflow-gap")) >= 1, "the first checkpoint")
    started = time.monotonic()
    result = pretrain(cfg)
    t.join(60)
    assert len(cut_at) == 2, "the outage did not happen during the run"
    losses = MlflowClient(proxy.url).get_metric_history(result.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(2, 41, 2)), "metrics were lost"
    during = [m.step for m in losses if cut_at[0] * 1000 < m.timestamp < cut_at[1] * 1000]
    assert during, "no step was logged while MLflow was down: training waited, or the gap was not flushed"
    assert result.model_version.isdigit()
    assert MlflowClient(proxy.url).get_run(result.run_id).info.status == "FINISHED"
    assert time.monotonic() - started > 30  # the run did span the outage


def test_mlflow_down_at_registration_fails_then_rerun_registers(data: Path, proxy: Proxy, ray_cluster: None,
                                                                 workspace: Path) -> None:
    storage = workspace / "faults-mlflow-register"
    cfg = byol_cfg(str(data), str(storage), proxy.url, steps=8, train__run_name="mlflow-register",
                   tracking__retry_s=4)
    back = threading.Event()

    class BringBack(logging.Handler):
        """Restores the server once registration has failed and raysl starts marking the run FAILED."""

        def emit(self, record: logging.LogRecord) -> None:
            if "marking the MLflow run FAILED" in record.getMessage() and not back.is_set():
                back.set()
                proxy.resume()

    handler = BringBack()
    logging.getLogger("raysl").addHandler(handler)

    def cut_at_last_checkpoint() -> None:
        wait_for("the final checkpoint", lambda: len(local_checkpoints(storage, "mlflow-register")) >= 2)
        proxy.cut()

    t = threading.Thread(target=cut_at_last_checkpoint, daemon=True)
    t.start()
    try:
        with pytest.raises(RegistrationError, match="run the same command again"):
            pretrain(cfg)
    finally:
        logging.getLogger("raysl").removeHandler(handler)
        if not back.is_set():
            proxy.resume()
    state = read_state(state_uri(str(storage), "mlflow-register"), S3Settings())
    assert state is not None and state.trained and not state.complete
    client = MlflowClient(proxy.url)
    assert client.get_run(str(state.mlflow_run_id)).info.status == "FAILED"
    checkpoints = local_checkpoints(storage, "mlflow-register")
    losses = history(proxy.url, str(state.mlflow_run_id), "loss")

    result = pretrain(cfg)  # registers the finished checkpoint; trains nothing
    assert result.run_id == state.mlflow_run_id and result.model_version.isdigit()
    assert local_checkpoints(storage, "mlflow-register") == checkpoints
    assert history(proxy.url, result.run_id, "loss") == losses
    assert client.get_run(result.run_id).info.status == "FINISHED"
    versions = client.search_model_versions(f"run_id = '{result.run_id}'")
    assert len(versions) == 1


def test_mlflow_down_from_the_start_trains_then_rerun_registers(data: Path, mlflow_server: str,
                                                                ray_cluster: None, workspace: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    storage = workspace / "faults-mlflow-dead"
    cfg = byol_cfg(str(data), str(storage), dead, steps=4, train__run_name="mlflow-dead", tracking__retry_s=1)
    with pytest.raises(RegistrationError):
        pretrain(cfg)
    assert (local_checkpoints(storage, "mlflow-dead")[-1] / "encoder.safetensors").exists()
    live = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"tracking_uri": mlflow_server})})
    result = pretrain(live)
    assert result.model_version.isdigit() and result.metrics["step"] == 4
