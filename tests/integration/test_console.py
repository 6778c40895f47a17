"""What a person sees when they run `raysl pretrain`: raysl's progress lines and summary, no Ray Data bars,
no worker chatter, no Train-controller state-API warnings (even with another Ray instance on the machine),
and the first batch's augmentation grid in the MLflow run. (`--verbose`: tests/unit/test_console.py.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from raysl.demo import write_digits

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

RAYSL = str(Path(sys.executable).with_name("raysl"))
BAR_FRAGMENTS = ("Running Dataset", "- ReadFiles", "- ListFiles", "MapBatches(", "split(", "row/s]", "(pid=")


def _config(tmp: Path) -> Path:
    data = write_digits(tmp / "digits", shards=2)
    cfg = {
        "data": {"uri": str(data["train"])},
        "model": {"backbone": "resnet10t", "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
        "method": {"name": "byol", "projector_hidden": 128, "predictor_hidden": 128,
                   "views": {"crop_scale": [0.3, 1.0], "flip_p": 0.0}},
        "optim": {"name": "adamw", "lr": 1e-3, "scale_lr": False, "warmup_steps": 2},
        "train": {"steps": 6, "batch_size": 16, "num_workers": 1, "cpus_per_worker": 1, "log_every": 2,
                  "checkpoint_every": 6, "storage_path": str(tmp / "ckpt"), "torch_threads": 1},
        "tracking": {"experiment": "console", "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pretrain_console(tmp_path: Path) -> None:
    config = _config(tmp_path)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rslc-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYSL_VERBOSE")}
    env.update(RAY_TMPDIR=str(ray_tmp / "run"), TMPDIR=str(tmp_path), MLFLOW_DISABLE_TELEMETRY="true")
    # A second Ray instance on the machine: Ray Train's placement-group cleaner must still reach its own
    # cluster's state API instead of failing its autodetection ("Found multiple active Ray instances").
    other = subprocess.Popen(
        [sys.executable, "-c", "import ray, sys; ray.init(num_cpus=0, include_dashboard=False); "
                               "print('up', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=dict(env, RAY_TMPDIR=str(ray_tmp / "other")))
    try:
        run = subprocess.run([RAYSL, "pretrain", "--config", str(config)], env=env, capture_output=True, text=True,
                             timeout=300, check=False)
        assert other.stdout is not None and other.stdout.readline().strip() == "up"
        console = run.stderr
        assert run.returncode == 0, console[-3000:]

        progress = re.findall(r"step (\d+)/6  loss [\d.]+  \d+ img/s  elapsed \d+:\d\d  ETA (\S+)", console)
        assert [int(s) for s, _ in progress] == [2, 4, 6], console
        assert progress[0][1] == "?" and all(re.fullmatch(r"\d+:\d\d", eta) for _, eta in progress[1:])
        assert "finished 6 steps in" in console and "models:/raysl-byol-encoder@candidate (version 1)" in console
        for fragment in BAR_FRAGMENTS + ("(RayTrainWorker", "(TrainController", "Failed to query Ray Train"):
            assert fragment not in console + run.stdout, fragment
        assert len(console.splitlines()) < 40, console

        logs = next((ray_tmp / "run").glob("ray/session_*/logs"))
        texts = [p.read_text(errors="replace") for p in logs.glob("*") if p.is_file()]
        assert any("PlacementGroupCleaner" in t for t in texts)  # the cleaner ran: the check below means something
        # ... and Ray Data's banners were switched off where the training dataset runs (its SplitCoordinator),
        # not merely kept off this console by log_to_driver
        for bad in ("Failed to query Ray Train Controller", "Found multiple active Ray instances",
                    "Starting execution of Dataset"):
            assert not any(bad in t for t in texts), bad
        assert "step 6/6" in (logs / "raysl-driver.log").read_text()

        from mlflow.tracking import MlflowClient

        # stdout holds the JSON result, and sometimes a line of Ray's error channel (its "(raylet) WARNING: N
        # PYTHON worker processes have been started" goes to stdout even without log_to_driver)
        result = json.loads(re.search(r"^\{$.*^\}$", run.stdout, re.S | re.M).group(0))  # type: ignore[union-attr]
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        files = [f.path for f in client.list_artifacts(result["mlflow_run_id"], "augmentations")]
        assert files == ["augmentations/first_batch.png"]

    finally:
        if other.stdin is not None:
            other.stdin.close()
        try:
            other.wait(30)
        except subprocess.TimeoutExpired:
            other.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
