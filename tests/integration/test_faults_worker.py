"""Fault table: a training worker SIGKILLed mid-run. The run restarts from its last checkpoint, completes in
the same MLflow run with continuous step metrics, and each worker's data stream resumes exactly where the
checkpoint left it: the steps after it train on the same samples as before the kill, and no sample of the
epoch is trained on twice. The corpus holds 1% poisoned images, skipped and counted."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from raysl.train.launch import pretrain
from raysl.train.stream import TRACE_ENV

from .fault_data import byol_cfg, history, write_poisoned
from .faults import read_trace, registered_checkpoints, sigkill, train_worker_pids, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_sigkilled_worker_resumes_exactly(mlflow_server: str, ray_cluster: None, workspace: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    data = workspace / "faults-worker-data"
    poisoned = write_poisoned(data, bad_fraction=0.01)
    trace = workspace / "faults-worker-trace"
    trace.mkdir()
    monkeypatch.setenv(TRACE_ENV, str(trace))
    storage = workspace / "faults-worker-runs"
    cfg = byol_cfg(str(data), str(storage), mlflow_server, steps=24, train__run_name="killed-worker")
    killed: list[int] = []

    def kill_after_first_checkpoint() -> None:
        wait_for("the first checkpoint", lambda: registered_checkpoints(storage, "killed-worker") >= 1)
        # mid-way between checkpoints (every 4 steps), so both ranks have trained past the one they resume from
        wait_for("a step after it", lambda: (step := _steps_traced(trace)) >= 6 and step % 4 in (1, 2))
        pid = train_worker_pids()[0]
        sigkill(pid)
        killed.append(pid)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    result = pretrain(cfg)
    killer.join(5)
    assert killed, "no worker was killed"
    assert result.metrics["step"] == 24
    resumed = history(mlflow_server, result.run_id, "resumed_from_step")
    assert len(resumed) == 1 and resumed[0][1] in (4.0, 8.0, 12.0), resumed  # from a checkpoint, not from step 0
    restart = int(resumed[0][1])
    # every logged step is there; the steps between the checkpoint and the kill are there twice (both attempts)
    steps = [s for s, _ in history(mlflow_server, result.run_id, "loss")]
    assert sorted(set(steps)) == list(range(2, 25, 2)), steps
    assert all(s > restart for s in steps if steps.count(s) > 1), steps
    bad = history(mlflow_server, result.run_id, "bad_images")
    assert bad[-1][1] > 0  # the poisoned images were skipped and counted, and the run went on

    runs = read_trace(trace)
    for rank, attempts in runs.items():
        assert len(attempts) == 2, f"rank {rank}: expected one restart, got {len(attempts)} attempts"
        before = {s: k for s, _, k in attempts[0] if s > restart}
        again = {s: k for s, _, k in attempts[1] if s in before}
        assert before, f"rank {rank}: killed before it trained past step {restart}, nothing was replayed"
        assert again == before, f"rank {rank}: the replayed steps trained on other samples"
        # what the run trained on, per step: the last attempt's steps win over the first's
        final = [row for row in attempts[0] if row[0] <= restart] + attempts[1]
        epoch0 = [k for _, e, k in final if e == 0]
        assert len(epoch0) == len(set(epoch0)), f"rank {rank}: a sample was trained on twice in epoch 0"
    trained = {k for attempts in runs.values() for a in attempts for _, _, k in a}
    assert not trained & set(poisoned)


def _steps_traced(folder: Path) -> int:
    """The last step rank 0 has traced in its latest attempt (0 before any)."""
    attempts = read_trace(folder).get(0) or [[]]
    return attempts[-1][-1][0] if attempts[-1] else 0
