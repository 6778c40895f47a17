"""Fault table: runs that must stop, at once and with a reason, instead of being retried as worker failures
(half the images poisoned; NaN batches in a row; more workers than the cluster has), and a single NaN batch
that is skipped without harm. The NaN-skip run also carries secrets in its URIs and environment, and the test
looks for them in the logs, MLflow params and tags, the run-state file and the error texts."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raysl.train.errors import ClusterTooSmall, RunStopped
from raysl.train.launch import pretrain

from .fault_data import byol_cfg, history, write_poisoned
from .faults import local_checkpoints

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SECRET = "Sup3r/Secret+Pa55@word"  # the shapes that broke the old redaction: '/', '+', '@'
USERINFO_SECRET = "tok3n-Only-Secret-Value"
URL_PASSWORD = "Url-Pa55word-Secret"  # MLflow refuses a tracking URL whose password holds '/' or '@'
ENV_SECRET = "Env-Secret-Value-0123"


@pytest.fixture(scope="module")
def clean(workspace: Path) -> Path:
    folder = workspace / "faults-stop-clean"
    write_poisoned(folder, bad_fraction=0.0)
    return folder


def test_half_poisoned_data_stops_naming_examples_without_retrying(mlflow_server: str, ray_cluster: None,
                                                                   workspace: Path) -> None:
    data = workspace / "faults-stop-half"
    poisoned = write_poisoned(data, bad_fraction=0.5)
    cfg = byol_cfg(str(data), str(workspace / "faults-stop-half-runs"), mlflow_server, steps=20,
                   train__run_name="half-bad")
    with pytest.raises(RunStopped) as stopped:
        pretrain(cfg)
    msg = str(stopped.value)
    assert "could not be decoded" in msg and "max_bad_fraction=0.05" in msg
    assert any(k in msg for k in poisoned), msg  # names examples
    runs = MlflowClient(mlflow_server).search_runs(
        [MlflowClient(mlflow_server).get_experiment_by_name("it-faults").experiment_id],
        filter_string="tags.`raysl.run_name` = 'half-bad'")
    assert runs[0].info.status == "FAILED"
    assert not history(mlflow_server, runs[0].info.run_id, "resumed_from_step")  # not retried (max_failures=2)


def test_nan_batches_in_a_row_stop_and_keep_the_last_good_checkpoint(clean: Path, mlflow_server: str,
                                                                      ray_cluster: None, workspace: Path) -> None:
    storage = workspace / "faults-stop-nan"
    cfg = byol_cfg(str(clean), str(storage), mlflow_server, steps=20, train__run_name="nan-stop",
                   train__nan_at_steps=[6, 7, 8], train__max_bad_steps=3)
    with pytest.raises(RunStopped, match="not finite for 3 steps in a row"):
        pretrain(cfg)
    import torch

    kept = local_checkpoints(storage, "nan-stop")
    assert [torch.load(p / "state.pt", weights_only=True)["step"] for p in kept] == [4]  # the last good one


def test_more_workers_than_the_cluster_fails_in_bounded_time(clean: Path, mlflow_server: str, ray_cluster: None,
                                                             workspace: Path) -> None:
    cfg = byol_cfg(str(clean), str(workspace / "faults-stop-big"), mlflow_server, steps=4,
                   train__num_workers=64, train__placement_timeout_s=5)
    t0 = time.monotonic()
    with pytest.raises(ClusterTooSmall, match=r"num_workers=64.*asked CPU=32.*CPU=4 in all"):
        pretrain(cfg)
    assert time.monotonic() - t0 < 60


def test_one_nan_batch_is_skipped_and_no_secret_leaks(clean: Path, mlflow_server: str, ray_cluster: None,
                                                      workspace: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", ENV_SECRET)  # sent as a bearer header; this server ignores it
    host = mlflow_server.removeprefix("http://")
    tracking = f"http://raysl:{URL_PASSWORD}@{host}"  # the server ignores basic auth; raysl must not print it
    storage = workspace / "faults-stop-secret"
    cfg = byol_cfg(str(clean), str(storage), tracking, steps=8, train__run_name="nan-skip",
                   train__nan_at_steps=[3])
    caplog.set_level(logging.DEBUG)
    result = pretrain(cfg)
    assert history(mlflow_server, result.run_id, "skipped_steps")[-1][1] == 1.0
    assert all(v == v for _, v in history(mlflow_server, result.run_id, "loss"))  # finite after the skip

    errors = []
    for uri in (f"s3://AKIAEXAMPLE:{SECRET}@raysl-test/nothing-here", f"s3://{USERINFO_SECRET}@raysl-test/none"):
        bad = cfg.model_copy(update={"data": cfg.data.model_copy(update={"uri": uri})})
        with pytest.raises(Exception) as e:
            pretrain(bad)
        errors.append(f"{e.value!r} {e.value}")

    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    places = {
        "logs": caplog.text,
        "params": repr(run.data.params),
        "tags": repr(run.data.tags),
        "run state": (storage / "nan-skip" / "raysl-run.json").read_text(),
        "errors": " ".join(errors),
        "version tags": repr([v.tags for v in client.search_model_versions(f"run_id = '{result.run_id}'")]),
    }
    for secret in (SECRET, USERINFO_SECRET, URL_PASSWORD, ENV_SECRET, "testing-secret-do-not-log"):
        leaked = [where for where, text in places.items() if secret in text]
        assert not leaked, f"{secret!r} reached {leaked}"
