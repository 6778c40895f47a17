"""The local stack scripts (infra/local): MLflow on PostgreSQL with artifacts on S3, idempotent start, clean stop."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import pytest

from .conftest import S3
from .pg import local_stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting for a parent that does not reap."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())


def test_mlflow_on_postgres_with_s3_artifacts(s3: S3, workspace: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    with local_stack(tmp_path, s3.endpoint, s3.bucket) as stack:
        with urllib.request.urlopen(f"{stack.tracking_uri}/health", timeout=5) as resp:
            assert resp.read() == b"OK"

        client = MlflowClient(tracking_uri=stack.tracking_uri)
        exp_id = client.create_experiment("local-stack")
        run_id = client.create_run(exp_id).info.run_id
        client.log_metric(run_id, "loss", 0.5)
        client.log_text(run_id, "hello", "notes/hello.txt")
        client.set_terminated(run_id)

        # The run is a row in PostgreSQL, not in some SQLite file.
        with stack.pg_connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,))
            assert cur.fetchall() == [("FINISHED",)]
            cur.execute("SELECT value FROM metrics WHERE run_uuid = %s AND key = 'loss'", (run_id,))
            assert cur.fetchall() == [(0.5,)]
        conn.close()
        assert not list(stack.dir.glob("*.db"))

        # The artifact went through the server's proxy into the bucket.
        keys = s3.keys("mlflow/")
        assert any(k.endswith(f"{run_id}/artifacts/notes/hello.txt") for k in keys), keys

        # A second start reuses both servers.
        mlflow_pid = int((stack.dir / "mlflow.pid").read_text())
        pg_pid = int((stack.dir / "pg" / "postmaster.pid").read_text().splitlines()[0])
        again = stack.start()
        assert again.stdout.strip() == f"export MLFLOW_TRACKING_URI={stack.tracking_uri}"
        assert "PostgreSQL already running" in again.stderr
        assert "MLflow server already running" in again.stderr
        assert int((stack.dir / "mlflow.pid").read_text()) == mlflow_pid

        # The password stays in the password file: not on stdout, in stderr or in any log.
        password = (stack.dir / "pgpass").read_text().strip().rsplit(":", 1)[1]
        assert len(password) >= 32
        assert (stack.dir / "pgpass").stat().st_mode & 0o077 == 0
        logs = [again.stdout, again.stderr] + [p.read_text() for p in stack.dir.glob("*.log")]
        assert not any(password in text for text in logs)

        # stop.sh ends both (the context's own stop afterwards finds nothing to do).
        stopped = stack.stop()
        assert "mlflow: pid" in stopped.stderr and "postgres: pid" in stopped.stderr, stopped.stderr
        assert not _alive(mlflow_pid)
        assert not _alive(pg_pid)
        assert not (stack.dir / "pg" / "postmaster.pid").exists()
