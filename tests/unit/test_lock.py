"""RunLock on a local path: one holder at a time, a named holder in the refusal, stale holders taken over,
waiting for a release, a daemon heartbeat; the pipeline's lock is the same lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from raysl.lock import LockHeld, RunLock, held_by


def test_second_locker_refuses_until_the_first_releases(tmp_path: Path) -> None:
    uri = str(tmp_path / "runs" / "cfg.lock")
    first = RunLock(uri, ttl=60)
    first.acquire()
    with pytest.raises(LockHeld) as refused:
        RunLock(uri, ttl=60).acquire()
    message = str(refused.value)
    assert message.startswith("another run holds")
    assert f"held by {socket.gethostname()}/pid {os.getpid()} since 20" in message and "ttl 60 s" in message
    first.release()
    assert held_by(uri) is None and not Path(uri).exists()
    with RunLock(uri, ttl=60) as second:
        assert held_by(uri)["token"] == second.owner["token"]  # type: ignore[index]


def test_body_names_host_pid_and_start_and_heartbeat_is_a_daemon(tmp_path: Path) -> None:
    uri = str(tmp_path / "cfg.lock")
    before = time.time()
    with RunLock(uri, ttl=60) as lock:
        body = held_by(uri)
        assert body is not None
        assert body["host"] == socket.gethostname() and body["pid"] == os.getpid()
        assert before <= body["started"] <= body["heartbeat"] <= time.time() and body["ttl"] == 60
        beat = [t for t in threading.enumerate() if t.name == "raysl-lock-heartbeat"]
        assert beat and all(t.daemon for t in beat)
        assert lock._thread is not None and lock._thread.daemon
    assert not any(t.name == "raysl-lock-heartbeat" and t.is_alive() for t in threading.enumerate())


def test_a_dead_process_on_this_host_is_stale_at_once(tmp_path: Path) -> None:
    uri = str(tmp_path / "cfg.lock")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    Path(uri).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "token": "t",
                                     "started": time.time(), "heartbeat": time.time(), "ttl": 3600}))
    t0 = time.monotonic()
    with RunLock(uri, ttl=60):
        assert held_by(uri)["pid"] == os.getpid()  # type: ignore[index]
    assert time.monotonic() - t0 < 2  # no waiting for the ttl


def test_a_live_holder_elsewhere_is_respected_until_its_ttl_passes(tmp_path: Path) -> None:
    uri = str(tmp_path / "cfg.lock")
    other = {"host": "elsewhere", "pid": 1, "token": "t", "started": time.time() - 50, "ttl": 30}
    Path(uri).write_text(json.dumps({**other, "heartbeat": time.time()}))
    with pytest.raises(LockHeld, match="held by elsewhere/pid 1 since"):
        RunLock(uri, ttl=60).acquire()
    Path(uri).write_text(json.dumps({**other, "heartbeat": time.time() - 31}))
    with RunLock(uri, ttl=60):
        assert held_by(uri)["host"] == socket.gethostname()  # type: ignore[index]


def test_wait_s_waits_for_the_holder_to_release(tmp_path: Path) -> None:
    uri = str(tmp_path / "cfg.lock")
    first = RunLock(uri, ttl=60)
    first.acquire()
    releaser = threading.Timer(1.5, first.release)
    releaser.start()
    t0 = time.monotonic()
    try:
        with RunLock(uri, ttl=60, wait_s=20) as second:
            waited = time.monotonic() - t0
            assert held_by(uri)["token"] == second.owner["token"]  # type: ignore[index]
    finally:
        releaser.join()
    assert 1.4 <= waited < 5


def test_wait_s_gives_up_after_waiting(tmp_path: Path) -> None:
    uri = str(tmp_path / "cfg.lock")
    with RunLock(uri, ttl=60):
        t0 = time.monotonic()
        with pytest.raises(LockHeld):
            RunLock(uri, ttl=60, wait_s=1.0).acquire()
        assert 1.0 <= time.monotonic() - t0 < 3


def test_a_lock_file_being_written_is_not_taken_over(tmp_path: Path) -> None:
    """A holder between its exclusive create and its write leaves an empty file: that is a fresh holder."""
    uri = str(tmp_path / "cfg.lock")
    Path(uri).write_bytes(b"")
    with pytest.raises(LockHeld):
        RunLock(uri, ttl=60).acquire()
    old = time.time() - 120
    os.utime(uri, (old, old))  # ...but one nobody wrote for longer than the ttl is stale
    with RunLock(uri, ttl=60):
        assert held_by(uri)["pid"] == os.getpid()  # type: ignore[index]


def test_pipeline_lock_is_the_run_lock_with_the_pipeline_message(tmp_path: Path) -> None:
    from raysl.pipeline import lock as pipeline_lock

    assert pipeline_lock.LockHeld is LockHeld and issubclass(pipeline_lock.PipelineLock, RunLock)
    uri = str(tmp_path / "lock.json")
    with pipeline_lock.PipelineLock(uri, ttl=60):
        with pytest.raises(LockHeld, match=f"another run of this pipeline holds .*/pid {os.getpid()} since"):
            pipeline_lock.PipelineLock(uri, ttl=60).acquire()
        with pytest.raises(LockHeld, match="another training run of this config holds"):
            RunLock(uri, ttl=60, what="training run of this config").acquire()
