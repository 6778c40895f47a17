"""Scheduled retraining end to end on real parts: data and pipeline state on S3 (moto over HTTP), MLflow on
PostgreSQL started by infra/local/start-mlflow.sh, a real Ray cluster. Run 1 promotes the first @champion;
run 2 on new data trains a warm-started candidate that the gate keeps; a second run while the lock is held
is refused; run 3 is killed after registering, and its rerun promotes exactly once; run 4 is a no-op."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from raysl.pipeline.config import load_pipeline
from raysl.pipeline.lock import LockHeld, PipelineLock
from raysl.pipeline.run import Pipeline

from .conftest import S3, digit_split
from .pg import mlflow_on_postgres

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

PRETRAIN = {
    "data": {"uri": "???"},
    "model": {"backbone": "resnet10t", "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
    "method": {"projector_hidden": 128, "predictor_hidden": 128, "views": {"crop_scale": [0.3, 1.0]}},
    "optim": {"name": "adamw", "lr": 2e-3, "scale_lr": False, "weight_decay": 1e-4, "warmup_steps": 1},
    "train": {"steps": 4, "batch_size": 32, "num_workers": 1, "log_every": 2, "checkpoint_every": 4,
              "torch_threads": 1},
    "tracking": {"experiment": "it-pipeline"},
}


def _upload_shard(s3: S3, key: str, indices: np.ndarray, corrupt: int = 0) -> None:
    """New data lands as a WebDataset shard (a tar of `<key>.png` + `<key>.cls`), as in production: Ray Data
    reads a few shards at once, while one object per image costs a metadata round trip each."""
    import io
    import tarfile

    from sklearn.datasets import load_digits

    from raysl.demo import digit_png

    d, buf = load_digits(), io.BytesIO()
    members = [(f"{i:05d}", digit_png(d.data[i]), str(d.target[i])) for i in indices]
    members += [(f"bad{i:03d}", b"not an image", "0") for i in range(corrupt)]
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, image, label in members:
            for suffix, data in ((".png", image), (".cls", label.encode())):
                info = tarfile.TarInfo(name + suffix)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=buf.getvalue())


def _cli(args: list[str], env_extra: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "raysl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **env_extra), check=False)


def test_pipeline_snapshot_gate_promote_idempotent(s3: S3, ray_cluster: None, workspace: Path) -> None:
    import ray
    from mlflow.tracking import MlflowClient

    bucket, root = s3.bucket, workspace / "pipeline"
    root.mkdir()
    train_idx, test_idx = digit_split()
    _upload_shard(s3, "pipe/data/a.tar", train_idx[:160])
    _upload_shard(s3, "pipe/labeled/train/0.tar", train_idx[600:900])
    _upload_shard(s3, "pipe/labeled/test/0.tar", test_idx[:150])
    (root / "pretrain.yaml").write_text(yaml.safe_dump(PRETRAIN | {
        "train": PRETRAIN["train"] | {"storage_path": f"s3://{bucket}/pipe/runs"}}))

    with mlflow_on_postgres(workspace, s3.endpoint, bucket) as uri:
        (root / "pipeline.yaml").write_text(yaml.safe_dump({
            "name": "it-weekly", "data": f"s3://{bucket}/pipe/data", "state": f"s3://{bucket}/pipe/state",
            "model_name": "it-pipe-encoder", "pretrain": {"config": "pretrain.yaml"},
            "evaluation": {"train": f"s3://{bucket}/pipe/labeled/train",
                           "test": f"s3://{bucket}/pipe/labeled/test", "probe": "knn", "k": 10},
            "tracking_uri": uri, "validate_samples": 0, "lock_ttl_s": 120}))  # validated in step 6
        client = MlflowClient(uri)

        def run(*overrides: str):  # type: ignore[no-untyped-def]
            cfg, base = load_pipeline(root / "pipeline.yaml", list(overrides))
            return Pipeline(cfg, base).run()

        def versions() -> list[str]:
            return sorted(v.version for v in client.search_model_versions("name = 'it-pipe-encoder'"))

        def champion() -> str:
            return str(client.get_model_version_by_alias("it-pipe-encoder", "champion").version)

        # 1. data A, no champion yet: trained from scratch and promoted
        first = run()
        assert (first.status, first.version, champion()) == ("promoted", "1", "1")
        v1 = client.get_model_version("it-pipe-encoder", "1")
        manifest_uri = v1.tags["raysl.snapshot_manifest"]
        assert manifest_uri.startswith(f"s3://{bucket}/pipe/state/it-weekly/snapshots/")
        manifest = json.loads(s3.client().get_object(Bucket=bucket, Key=manifest_uri[len(f"s3://{bucket}/"):])
                              ["Body"].read())
        assert manifest["count"] == 1 and manifest["bytes"] > 0 and manifest["newest"]
        assert v1.tags["raysl.parent_version"] == "none" and v1.tags["raysl.gate"] == "promoted"
        prun = client.get_run(v1.tags["raysl.pipeline_run_id"])
        assert prun.data.tags["raysl.outcome"] == "promoted" and prun.info.status == "FINISHED"
        assert client.get_run(v1.run_id).data.params["train.init_from"] == "None"

        # 2. data B lands; a margin no score can clear: trained (warm start from v1), registered, kept
        _upload_shard(s3, "pipe/data/b.tar", train_idx[160:320])
        second = run("gate.margin=1.0")
        assert (second.status, second.version, champion()) == ("kept", "2", "1")
        v2 = client.get_model_version("it-pipe-encoder", "2")
        assert v2.tags["raysl.parent_version"] == "1" and v2.tags["raysl.gate"] == "kept"
        assert float(v2.tags["raysl.eval.knn"]) == pytest.approx(second.scores["candidate"], abs=1e-4)
        assert float(v2.tags["raysl.eval.champion_knn"]) == pytest.approx(second.scores["champion"], abs=1e-4)
        assert "does not beat" in v2.tags["raysl.gate_reason"]
        init_from = client.get_run(v2.run_id).data.params["train.init_from"]
        assert init_from == client.get_run(v1.run_id).data.tags["raysl.checkpoint_uri"]
        assert json.loads(s3.client().get_object(Bucket=bucket, Key=v2.tags["raysl.snapshot_manifest"][
            len(f"s3://{bucket}/"):])["Body"].read())["count"] == 2

        # 3. while one run holds the lock, a second run of the same pipeline refuses at once
        env = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        lock_uri = f"s3://{bucket}/pipe/state/it-weekly/lock.json"
        with PipelineLock(lock_uri, ttl=120):
            with pytest.raises(LockHeld, match="another run of this pipeline holds"):
                run()  # refused before any work (`raysl pipeline run` exits with code 3)

        # 4. data C; killed after registering, before evaluating and promoting; the rerun promotes once
        _upload_shard(s3, "pipe/data/c.tar", train_idx[320:400])
        killed = _cli(["pipeline", "run", str(root / "pipeline.yaml"), "gate.margin=-1", "fault_after=pretrain"],
                      env, timeout=600)
        assert killed.returncode == 137, killed.stderr[-3000:]
        assert versions() == ["1", "2", "3"] and champion() == "1"
        third = run("gate.margin=-1")
        assert (third.status, third.version, champion()) == ("promoted", "3", "3")
        assert versions() == ["1", "2", "3"]  # not trained or registered again
        assert client.get_model_version("it-pipe-encoder", "3").tags["raysl.parent_version"] == "1"
        assert len(client.search_runs([client.get_experiment_by_name("it-pipeline").experiment_id])) == 3

        # 5. nothing new under the prefix: a no-op that says so
        fourth = run()
        assert fourth.status == "noop" and versions() == ["1", "2", "3"] and champion() == "3"

        # 6. a bad snapshot stops before training and keeps the champion
        _upload_shard(s3, "pipe/data/d.tar", train_idx[400:420], corrupt=40)  # 40 of 440 new: over 5%
        bad = run("validate_samples=1000")
        assert bad.status == "rejected-data" and "undecodable" in bad.reason
        assert versions() == ["1", "2", "3"] and champion() == "3"
