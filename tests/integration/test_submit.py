"""`raysl submit` and `raysl jobs` against a real Ray head (`ray start --head`, token auth on, dashboard up),
with the MLflow server and the S3 endpoint: a job trains and registers its encoder on the server named by a
variable passed with --env; the secret key passed the same way never shows in what raysl prints; a bad config
ends FAILED with the reason in the printed log tail; a dead address fails in seconds; a wrong token is refused."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from .conftest import RayHead, _free_port, write_digit_folder

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SECRET = "testing-secret-do-not-log"  # what the s3 fixture puts in AWS_SECRET_ACCESS_KEY
ENV = ["--env", "MLFLOW_TRACKING_URI", "--env", "AWS_ENDPOINT_URL", "--env", "AWS_ACCESS_KEY_ID",
       "--env", "AWS_SECRET_ACCESS_KEY"]
MODEL = "it-submit-encoder"


def raysl(*args: str, env: dict[str, str], timeout: float = 240, cwd: Path | None = None,
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "raysl.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


@pytest.fixture(scope="module")
def job_dir(workspace: Path) -> Path:
    """The job's working directory: a tiny BYOL config, and the same config with a field that does not exist."""
    root = workspace / "submit-job"
    data = write_digit_folder(workspace / "submit-digits", np.arange(160))
    cfg = {
        "data": {"uri": str(data)},
        "model": {"backbone": "resnet10t", "image_size": 32},
        "method": {"projector_hidden": 128, "predictor_hidden": 128, "projector_dim": 32},
        "optim": {"name": "adamw", "lr": 1e-3, "scale_lr": False, "warmup_steps": 1},
        "train": {"steps": 6, "batch_size": 16, "num_workers": 2, "cpus_per_worker": 0.5, "log_every": 2,
                  "checkpoint_every": 6, "storage_path": str(workspace / "submit-runs"), "torch_threads": 1},
        "tracking": {"experiment": "it-submit", "register_as": MODEL},  # no URI: $MLFLOW_TRACKING_URI decides
    }
    root.mkdir()
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    cfg["train"]["bogus_field"] = 3
    (root / "bad.yaml").write_text(yaml.safe_dump(cfg))
    return root


@pytest.fixture(scope="module")
def env(ray_head: RayHead, mlflow_server: str) -> dict[str, str]:
    # MLFLOW_TRACKING_URI is in the submitter's environment only: the head was started without it, so a model
    # on the server proves --env carried it into the job.
    return ray_head.env(MLFLOW_TRACKING_URI=mlflow_server)


@pytest.fixture(scope="module")
def submitted(job_dir: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    out = raysl("submit", "--working-dir", str(job_dir), *ENV, "--submission-id", "it-submit-ok", "--wait",
                "--", "pretrain", "--config", "tiny.yaml", env=env, cwd=job_dir)
    return out, time.monotonic() - t0


def test_submit_wait_trains_and_registers(submitted: tuple[subprocess.CompletedProcess[str], float],
                                          mlflow_server: str) -> None:
    out, took = submitted
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.splitlines()[0] == "it-submit-ok"
    assert SECRET not in out.stdout + out.stderr
    from mlflow.tracking import MlflowClient

    mv = MlflowClient(mlflow_server).get_model_version_by_alias(MODEL, "candidate")
    assert mv.version == "1"
    print(f"submit --wait of the tiny job: {took:.1f}s")


def test_jobs_logs_status_list(submitted: tuple[subprocess.CompletedProcess[str], float],
                               env: dict[str, str]) -> None:
    logs = raysl("jobs", "logs", "it-submit-ok", env=env, timeout=60)
    assert logs.returncode == 0, logs.stderr
    steps = [line for line in logs.stdout.splitlines() if "step" in line and "loss" in line]
    assert steps, logs.stdout[-3000:]
    assert "Failed to query Ray Train Controller" not in logs.stdout

    status = raysl("jobs", "status", "it-submit-ok", env=env, timeout=60)
    assert status.returncode == 0 and '"SUCCEEDED"' in status.stdout, status.stdout + status.stderr
    assert "AWS_SECRET_ACCESS_KEY" in status.stdout  # the name is shown …
    listed = raysl("jobs", "list", env=env, timeout=60)
    listed_json = raysl("jobs", "list", "--json", env=env, timeout=60)
    assert "it-submit-ok" in listed.stdout and "it-submit-ok" in listed_json.stdout
    for out in (status, listed, listed_json):
        assert SECRET not in out.stdout + out.stderr  # … its value never is


def test_resubmit_same_id(job_dir: Path, submitted: tuple[subprocess.CompletedProcess[str], float],
                          env: dict[str, str]) -> None:
    again = raysl("submit", "--working-dir", str(job_dir), *ENV, "--submission-id", "it-submit-ok",
                  "--", "pretrain", "--config", "tiny.yaml", env=env, timeout=60)
    assert again.returncode == 0 and "not submitted again" in again.stderr, again.stderr
    other = raysl("submit", "--submission-id", "it-submit-ok", "--", "pretrain", "--config", "other.yaml",
                  env=env, timeout=60)
    assert other.returncode == 2 and "already used by another command" in other.stderr, other.stderr


def test_bad_config_fails_with_log_tail(job_dir: Path, env: dict[str, str]) -> None:
    out = raysl("submit", "--working-dir", str(job_dir), *ENV, "--wait", "--", "pretrain", "--config", "bad.yaml",
                env=env, timeout=180)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "FAILED" in out.stderr and "last" in out.stderr
    assert "bogus_field" in out.stderr.split("lines of the job's log", 1)[1]
    assert SECRET not in out.stdout + out.stderr


def test_dead_address_fails_fast(ray_head: RayHead) -> None:
    t0 = time.monotonic()
    out = raysl("submit", "--address", f"http://127.0.0.1:{_free_port()}", "--", "pretrain", "--config", "byol",
                env=ray_head.env(), timeout=60)
    took = time.monotonic() - t0
    assert out.returncode == 2 and "cannot reach a Ray cluster" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert took < 10, took
    print(f"submit to a closed port failed in {took:.1f}s")


def test_token_is_required_and_checked(ray_head: RayHead, workspace: Path) -> None:
    no_token = {k: v for k, v in ray_head.env(RAY_AUTH_MODE="disabled").items() if k != "RAY_AUTH_TOKEN_PATH"}
    out = raysl("jobs", "list", env=no_token, timeout=60)
    assert out.returncode == 2 and "requires a token" in out.stderr, out.stderr
    wrong = workspace / "wrong-token"
    wrong.write_text("not-the-token")
    out = raysl("jobs", "list", "--token-file", str(wrong), env=ray_head.env(), timeout=60)
    assert out.returncode == 2 and "rejected the token" in out.stderr, out.stderr
