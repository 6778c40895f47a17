"""The local stack as the project's own scripts start it: an MLflow server on PostgreSQL with artifacts on S3.

A helper module, not a fixture file: `from .pg import mlflow_on_postgres`. It runs
infra/local/start-mlflow.sh (BACKEND=postgres) with DIR a new folder under the given one, free ports,
and infra/local/stop.sh with the same DIR at exit, so tests exercise exactly what a user runs.
The S3 endpoint and keys come from os.environ (the `s3` fixture in conftest.py sets them).
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "infra" / "local"


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (all sockets held open while choosing)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def _searchable_by_others(path: Path) -> None:
    """As root, PostgreSQL runs as user `postgres`, which must traverse every folder above its data
    folder; pytest's base temp folder is mode 700. Add only the search bit (o+x), never read."""
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if not mode & stat.S_IXOTH:
            p.chmod(mode | stat.S_IXOTH)


@dataclass(frozen=True)
class LocalStack:
    """A running stack: where its scripts keep their files, its ports and the environment they ran with."""

    dir: Path
    tracking_uri: str
    pg_port: int
    env: dict[str, str]

    def script(self, name: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        """Run infra/local/NAME with the stack's settings; the caller checks the return code."""
        return subprocess.run(["bash", str(SCRIPTS / name)], env=self.env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def start(self) -> subprocess.CompletedProcess[str]:
        """Run start-mlflow.sh (idempotent); raise with its stderr when it fails."""
        res = self.script("start-mlflow.sh")
        if res.returncode != 0:
            raise RuntimeError(f"start-mlflow.sh failed ({res.returncode}):\n{res.stderr[-4000:]}")
        return res

    def stop(self) -> subprocess.CompletedProcess[str]:
        """Run stop.sh (MLflow server and PostgreSQL); raise with its stderr when it fails."""
        res = self.script("stop.sh", timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"stop.sh failed ({res.returncode}):\n{res.stderr[-4000:]}")
        return res

    def pg_connect(self) -> Any:
        """A psycopg2 connection to the MLflow database, as role mlflow, password from the stack's pgpass."""
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.pg_port, user="mlflow", dbname="mlflow",
                                passfile=str(self.dir / "pgpass"), connect_timeout=5)


@contextmanager
def local_stack(workdir: Path, s3_endpoint: str, bucket: str, workers: int = 1) -> Iterator[LocalStack]:
    """Start PostgreSQL and the MLflow server with the project's scripts in a new folder `workdir`/stack-*;
    stop both at exit (also when starting failed half-way)."""
    Path(workdir).mkdir(parents=True, exist_ok=True)
    stack_dir = Path(tempfile.mkdtemp(prefix="stack-", dir=Path(workdir).resolve()))
    if os.geteuid() == 0:
        _searchable_by_others(stack_dir)
    port, pg_port = free_ports(2)
    env = dict(os.environ, DIR=str(stack_dir), PORT=str(port), PGPORT=str(pg_port), PYTHON=sys.executable,
               BUCKET=bucket, WORKERS=str(workers), BACKEND="postgres", AWS_ENDPOINT_URL=s3_endpoint)
    stack = LocalStack(stack_dir, f"http://127.0.0.1:{port}", pg_port, env)
    try:
        out = stack.start().stdout
        expected = f"export MLFLOW_TRACKING_URI={stack.tracking_uri}"
        if out.strip() != expected:
            raise RuntimeError(f"start-mlflow.sh printed {out!r}, expected {expected!r}")
        yield stack
    except BaseException:
        stack.script("stop.sh", timeout=120)
        raise
    else:
        stack.stop()


@contextmanager
def mlflow_on_postgres(workdir: Path, s3_endpoint: str, bucket: str) -> Iterator[str]:
    """An MLflow tracking server on PostgreSQL with artifacts in s3://`bucket`/mlflow; yields its URI."""
    with local_stack(workdir, s3_endpoint, bucket) as stack:
        yield stack.tracking_uri
