"""The pipeline's parts without Ray: its config, snapshots and their manifests, the lock, warm starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from raysl import storage
from raysl.config_base import ConfigError
from raysl.pipeline import snapshot
from raysl.pipeline.config import load_pipeline
from raysl.pipeline.lock import LockHeld, PipelineLock
from raysl.storage import StorageError
from raysl.train.checkpoint import warm_start

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_shipped_pipeline_config_parses() -> None:
    cfg, base = load_pipeline(REPO / "pipelines" / "retrain.yaml")
    assert cfg.model_name and cfg.evaluation.probe in ("knn", "linear", "zero_shot") and base == REPO / "pipelines"


@pytest.mark.parametrize(("override", "field"), [
    ("gate.bogus=1", "gate.bogus"), ("evaluation.probe=svm", "evaluation.probe"), ("name=has space", "name"),
    ("fault_after=never", "fault_after"),
])
def test_pipeline_config_errors_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_pipeline(REPO / "pipelines" / "retrain.yaml", [override])


def test_pipeline_config_refuses_mixed_storage() -> None:
    with pytest.raises(ConfigError, match="both be s3:// or both local"):
        load_pipeline(REPO / "pipelines" / "retrain.yaml", ["state=/tmp/state"])


def test_snapshot_id_follows_the_listing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(3):
        _write(data / "a" / f"{i}.png", bytes(10 + i))
    _write(data / ".hidden" / "x.png")
    _write(data / "_tmp.png")
    first, again = snapshot.take(str(data)), snapshot.take(str(data))
    assert first.id == again.id and first.count == 3 and first.bytes == 10 + 11 + 12
    assert not any("hidden" in f["path"] or "_tmp" in f["path"] for f in first.files)
    _write(data / "b" / "new.png", b"yy")
    os.utime(data / "b" / "new.png", (time.time() + 5, time.time() + 5))
    second = snapshot.take(str(data))
    assert second.id != first.id and second.count == 4 and second.newest_mtime > first.newest_mtime
    with pytest.raises(StorageError, match="does not exist"):
        snapshot.take(str(tmp_path / "missing"))


def test_a_manifest_freezes_what_readers_list(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(3):
        _write(data / f"{i}.png")
    snap = snapshot.take(str(data))
    manifest = str(tmp_path / "state" / f"{snap.id}{storage.SNAPSHOT_SUFFIX}")
    snapshot.write(snap, str(data), manifest)
    _write(data / "late.png")  # lands after the snapshot: not part of it
    listed = storage.list_files(manifest)
    assert listed == [f["path"] for f in snap.files] and not any("late" in f for f in listed)
    assert json.loads(Path(manifest).read_text())["count"] == 3
    _write(tmp_path / f"broken{storage.SNAPSHOT_SUFFIX}", b"{not json")
    with pytest.raises(StorageError, match="cannot be read"):
        storage.list_files(str(tmp_path / f"broken{storage.SNAPSHOT_SUFFIX}"))


def test_local_lock_excludes_a_second_holder_and_frees_on_exit(tmp_path: Path) -> None:
    uri = str(tmp_path / "lock.json")
    with PipelineLock(uri, ttl=60) as first:
        with pytest.raises(LockHeld, match="holds"):
            PipelineLock(uri, ttl=60).acquire()
        assert not first.lost
    assert not Path(uri).exists()
    PipelineLock(uri, ttl=60).acquire()  # free again


def test_local_lock_of_a_dead_process_or_past_its_ttl_is_taken_over(tmp_path: Path) -> None:
    uri = str(tmp_path / "lock.json")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    Path(uri).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "token": "t",
                                     "heartbeat": time.time(), "ttl": 600}))
    lock = PipelineLock(uri, ttl=60)
    lock.acquire()
    assert json.loads(Path(uri).read_text())["pid"] == os.getpid()
    lock.release()
    Path(uri).write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "t", "heartbeat": time.time() - 100,
                                     "ttl": 30}))
    with PipelineLock(uri, ttl=60):
        assert json.loads(Path(uri).read_text())["host"] != "elsewhere"


def test_lock_heartbeat_keeps_it_fresh_and_notices_a_takeover(tmp_path: Path) -> None:
    uri = str(tmp_path / "lock.json")
    lock = PipelineLock(uri, ttl=4)  # beats every second
    lock.acquire()
    first = json.loads(Path(uri).read_text())["heartbeat"]
    time.sleep(2.5)
    assert json.loads(Path(uri).read_text())["heartbeat"] > first
    Path(uri).write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "other", "heartbeat": time.time(),
                                     "ttl": 4}))
    time.sleep(2.5)
    assert lock.lost
    lock.release()
    assert json.loads(Path(uri).read_text())["token"] == "other"  # never deletes a lock it no longer holds


def test_warm_start_loads_weights_and_refuses_another_architecture() -> None:
    src, dst = nn.Linear(4, 3), nn.Linear(4, 3)
    warm_start(dst, src.state_dict(), "ckpt")
    assert torch.equal(dst.weight, src.weight)
    with pytest.raises(ValueError, match="does not fit"):
        warm_start(nn.Linear(5, 3), src.state_dict(), "ckpt")


def test_cli_refuses_with_exit_code_3_while_the_lock_is_held(tmp_path: Path) -> None:
    _write(tmp_path / "data" / "0.png")
    cfg = tmp_path / "pipe.yaml"
    cfg.write_text(f"name: p\ndata: {tmp_path / 'data'}\nstate: {tmp_path / 'state'}\nmodel_name: m\n"
                   f"pretrain: {{config: byol}}\nevaluation: {{train: {tmp_path / 'labeled'}}}\n")
    with PipelineLock(str(tmp_path / "state" / "p" / "lock.json"), ttl=60):
        out = subprocess.run([sys.executable, "-m", "raysl.cli", "pipeline", "run", str(cfg)], capture_output=True,
                             text=True, timeout=120)
    assert out.returncode == 3, out.stderr
    assert "another run of this pipeline holds" in out.stderr and f"pid {os.getpid()}" in out.stderr
