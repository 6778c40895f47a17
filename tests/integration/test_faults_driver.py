"""Fault table: the driver killed mid-run, a second copy of the same run started meanwhile, and a checkpoint
replaced by a pickle that would run code. `raysl pretrain` runs as its own process on the session's Ray
cluster; the copy refuses at once (one run of a config at a time); after SIGKILL the poisoned checkpoint is
refused without running anything; with the real checkpoint back, a rerun resumes into the same MLflow run."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raysl.train.checkpoint import STATE_FILE
from raysl.train.launch import pretrain

from .conftest import RayHead
from .fault_data import byol_cfg, history, write_poisoned
from .faults import registered_checkpoint_dirs, registered_checkpoints, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


class _RunsCode:
    """Unpickling this calls os.system: what a poisoned state.pt would do if it were loaded unsafely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _raysl(args: list[str], head: RayHead, log: Path) -> subprocess.Popen[bytes]:
    env = head.env(RAY_ADDRESS=head.gcs_address, RAY_AUTH_MODE="token")
    return subprocess.Popen([str(Path(sys.executable).parent / "raysl"), *args], env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def test_killed_driver_rerun_resumes_and_poisoned_checkpoint_is_refused(
        mlflow_server: str, ray_head: RayHead, ray_cluster: None, workspace: Path) -> None:
    data = workspace / "faults-driver-data"
    write_poisoned(data, bad_fraction=0.0)
    storage = workspace / "faults-driver-runs"
    cfg = byol_cfg(str(data), str(storage), mlflow_server, steps=400, train__run_name="killed-driver",
                   train__checkpoint_every=4, train__lock_ttl_s=30)
    config = workspace / "faults-driver.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))

    first = _raysl(["pretrain", "--config", str(config)], ray_head, workspace / "driver-first.log")
    try:
        wait_for("the first driver's second checkpoint", lambda: registered_checkpoints(storage, "killed-driver") >= 2
                 or first.poll() is not None, timeout=240)
        assert first.poll() is None, (workspace / "driver-first.log").read_text()[-3000:]
        second = subprocess.run([str(Path(sys.executable).parent / "raysl"), "pretrain", "--config", str(config)],
                                capture_output=True, text=True, timeout=120,
                                env=ray_head.env(RAY_ADDRESS=ray_head.gcs_address))
        assert second.returncode != 0
        assert "already running" in second.stderr + second.stdout
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    ckpts = registered_checkpoint_dirs(storage, "killed-driver")
    latest = ckpts[-1]  # what a rerun resumes from
    assert len(ckpts) >= 2  # the first driver got this far, and no further: it was killed, not finished
    target = _step(latest) + 4

    # A checkpoint whose state.pt would run code when unpickled: refused, nothing runs.
    marker = workspace / "pwned"
    real = workspace / "state.pt.real"
    shutil.copy(latest / STATE_FILE, real)
    (latest / STATE_FILE).write_bytes(pickle.dumps({"step": _RunsCode(marker)}))
    short = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": target})})
    with pytest.raises(Exception, match="refused") as refused:
        pretrain(short)
    assert not marker.exists(), "the poisoned checkpoint ran code"
    assert "never unpickles" in str(refused.value)

    # The real checkpoint back: the rerun resumes from it into the same MLflow run. Fewer steps than the killed
    # run asked for keep the test short; the run name (set) is what ties the two together.
    shutil.copy(real, latest / STATE_FILE)
    result = pretrain(short)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("it-faults").experiment_id],
                              filter_string="tags.`raysl.run_name` = 'killed-driver'")
    assert [r.info.run_id for r in runs] == [result.run_id]  # one MLflow run across the kill
    resumed = history(mlflow_server, result.run_id, "resumed_from_step")
    assert resumed and resumed[-1][1] == target - 4  # from the checkpoint the killed driver left
    assert client.get_run(result.run_id).info.status == "FINISHED"


def _step(checkpoint: Path) -> int:
    import torch

    return int(torch.load(checkpoint / STATE_FILE, weights_only=True)["step"])
