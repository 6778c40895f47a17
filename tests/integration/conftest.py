"""Real services for integration tests, started here on 127.0.0.1: a moto S3 server over HTTP, an MLflow
tracking server (SQLite backend, artifacts on that S3 endpoint) and a local Ray cluster."""

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
def ray_cluster(s3: S3, workspace: Path) -> Iterator[None]:
    import ray

    # Started after the S3 variables are set, so every Ray worker inherits the endpoint and keys.
    # Logical CPUs above the 2 physical ones leave room for Ray Data tasks next to 2 training workers.
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=str(workspace / "ray"))
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
