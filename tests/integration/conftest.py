"""Real services for integration tests, started here on 127.0.0.1: a moto S3 server over HTTP, an MLflow
tracking server (SQLite backend, artifacts on that S3 endpoint) and one Ray cluster for the session: a head
started with `ray start --head` (dashboard, Jobs API, token auth) that tests submit jobs to and join in-process."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BUCKET = "raysl-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout}s: {log.read_text()[-2000:]}")


@contextmanager
def _serve(cmd: list[str], ready_url: str, log: Path, env: dict[str, str], timeout: float) -> Iterator[None]:
    """Run a server process until the block ends; ready once `ready_url` answers over HTTP."""
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        _wait_http(ready_url, proc, timeout, log)
        yield
    finally:
        proc.terminate()
        proc.wait(30)


@dataclass
class S3:
    endpoint: str
    bucket: str

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for p in pages for o in p.get("Contents", [])]


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("it")
    tmp = root / "tmp"
    tmp.mkdir()
    os.environ["TMPDIR"] = str(tmp)  # MLflow leaves temporary folders behind; keep them here
    return root


@pytest.fixture(scope="session")
def s3(workspace: Path) -> Iterator[S3]:
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({
        "AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-do-not-log",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true",
    })
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with _serve(cmd, endpoint, workspace / "moto.log", dict(os.environ), timeout=30):
        server = S3(endpoint, BUCKET)
        server.client().create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture(scope="session")
def mlflow_server(s3: S3, workspace: Path) -> Iterator[str]:
    port = _free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_S3_ENDPOINT_URL=s3.endpoint)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{workspace / 'mlflow.db'}",
           "--artifacts-destination", f"s3://{s3.bucket}/mlflow", "--workers", "1"]
    uri = f"http://127.0.0.1:{port}"
    with _serve(cmd, f"{uri}/health", workspace / "mlflow.log", env, timeout=120):
        yield uri


@pytest.fixture(scope="session")
def ray_cluster(ray_head: RayHead) -> Iterator[None]:
    import ray

    # This process joins the session's one Ray cluster, the `ray_head` the job tests submit to (2 cores do not
    # carry two clusters). It was started after the S3 variables were set, so every worker inherits the endpoint
    # and keys, and with 4 logical CPUs: room for Ray Data tasks next to 2 training workers.
    # Ray reads RAY_AUTH_MODE into its config when it is imported (here: while tests were collected) and an
    # explicit address never turns token auth on by itself: set it, then re-read the config, as Ray's own
    # `_enable_token_auth` does. The token is the one the head uses (Ray's default lookup).
    from ray._raylet import Config

    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")
    ray.init(address=ray_head.gcs_address)
    yield
    ray.shutdown()


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_digit_folder(root: Path, indices: np.ndarray) -> Path:
    """Digits as 32×32 PNG files in class sub-folders, the layout `raysl data shard` reads."""
    from sklearn.datasets import load_digits

    from raysl.demo import digit_png

    d = load_digits()
    for i in indices:
        cls = root / str(d.target[i])
        cls.mkdir(parents=True, exist_ok=True)
        (cls / f"{i:05d}.png").write_bytes(digit_png(d.data[i]))
    return root


def digit_split(seed: int = 0, n_test: int = 500) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(1797)
    return order[n_test:], order[:n_test]


@dataclass
class RayHead:
    """A Ray head started with `ray start --head`: its Jobs API (dashboard) URL, GCS address and token file."""

    url: str
    gcs_address: str
    token_path: Path

    def env(self, **extra: str) -> dict[str, str]:
        """The environment a client process needs: the address and Ray's own token-path variable."""
        return dict(os.environ, RAY_API_SERVER_ADDRESS=self.url, RAY_AUTH_TOKEN_PATH=str(self.token_path), **extra)


def _head_processes(leader: int, temp_dir: Path) -> list[int]:
    """Live processes of one head: its session (`ray start` leads it; Ray workers leave its process group but
    not its session) and job drivers (Ray starts those in sessions of their own) by a cwd in its temp dir."""
    found = []
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            state, _, _, session = (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[:4]
            if state != "Z" and (int(session) == leader
                                 or Path(os.readlink(proc_dir / "cwd")).is_relative_to(temp_dir)):
                found.append(int(proc_dir.name))
        except (OSError, ValueError):
            continue
    return found


def _stop_head(proc: subprocess.Popen, temp_dir: Path) -> None:
    """Stop this head only (`ray stop` would stop every Ray cluster on the machine). A graceful stop takes Ray
    over 20 s here, and nothing in it is kept: SIGTERM, a short grace, then SIGKILL."""
    import signal

    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        for pid in _head_processes(proc.pid, temp_dir):
            try:
                os.kill(pid, sig)
            except OSError:
                continue
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _head_processes(proc.pid, temp_dir):
            time.sleep(0.2)
    proc.wait(5)


@pytest.fixture(scope="session")
def ray_head(s3: S3, workspace: Path) -> Iterator[RayHead]:
    """`ray start --head` with the dashboard and the Jobs API on free ports, token auth on, 4 logical CPUs.
    Started after `s3` set the S3 variables, so its workers inherit them."""
    import tempfile

    # Ray's socket paths (session folder + sockets/dash_MetricsHead) must stay under 107 bytes, which a pytest
    # folder does not allow: the head's temp dir is a short link in /tmp to a folder in the workspace.
    (workspace / "ray-head").mkdir()
    temp_dir = Path(tempfile.mkdtemp(prefix="raysl-rh-", dir="/tmp")) / "t"
    temp_dir.symlink_to(workspace / "ray-head")
    bin_dir = str(Path(sys.executable).parent)
    # Ray's own token, as `ray.init()` sets one up for a local cluster: $RAY_AUTH_TOKEN, the file at
    # $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, created if missing. This process, and any local cluster an
    # earlier test started in it, use the same one, so `ray.init(address=…)` joins without more set-up.
    token = subprocess.run([f"{bin_dir}/ray", "get-auth-token", "--generate"], capture_output=True, text=True,
                           check=True, timeout=60).stdout.strip()
    token_path = workspace / "ray-token"  # a copy, for clients to find through $RAY_AUTH_TOKEN_PATH
    token_path.touch(0o600)
    token_path.write_text(token)
    ports = {flag: _free_port() for flag in ("--port", "--dashboard-port", "--ray-client-server-port",
                                             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                             "--metrics-export-port", "--runtime-env-agent-port",
                                             "--node-manager-port", "--object-manager-port")}
    cmd = [f"{bin_dir}/ray", "start", "--head", "--block", "--num-cpus", "4", "--include-dashboard", "true",
           "--dashboard-host", "127.0.0.1", "--temp-dir", str(temp_dir), "--disable-usage-stats",
           *[str(x) for kv in ports.items() for x in kv]]
    # Job entrypoints run `raysl …` from PATH, as on a cluster image with raysl installed. Ray Train's controller
    # acts on what it sees in its polls of the workers, every 2 s by default: every run here is seconds long and
    # waited for (start, each report's checkpoint, the end, a killed worker), so it polls every 0.5 s.
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5")
    log = workspace / "ray-head.log"
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        request = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
        current = temp_dir / "ray_current_cluster"  # the GCS address, written once `ray start` is done
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(request, timeout=2):
                    if current.is_file() and current.read_text().strip():
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Jobs API at {url} did not answer: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        gcs = current.read_text().strip()
        yield RayHead(url, gcs, token_path)
    finally:
        _stop_head(proc, workspace / "ray-head")
        temp_dir.unlink()
        temp_dir.parent.rmdir()
