"""One `raysl pretrain` driver lists its data prefix once: the checks before any worker starts (check_source) and
the workers' file list (source_files) share one listing pass, counted on the wire between raysl and the S3
endpoint. A prefix that matches nothing still fails there, naming the URI."""

from __future__ import annotations

import collections
import http.client
import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from botocore.config import Config

from raysl.config import PretrainConfig, parse_config
from raysl.methods import get_method
from raysl.storage import S3Settings, StorageError
from tests.integration.conftest import S3

N_OBJECTS = 2500


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _forward(self) -> None:
        srv: CountingProxy = self.server  # type: ignore[assignment]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        with srv.lock:
            srv.requests.append((self.command, self.path))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
        conn = http.client.HTTPConnection(*srv.target, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(k, v)
        # a HEAD's Content-Length is the object's size, which is how the client learns it
        self.send_header("Content-Length", (resp.getheader("Content-Length") or "0") if self.command == "HEAD"
                         else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


class CountingProxy(ThreadingHTTPServer):
    """An HTTP proxy in front of the session's S3 endpoint that records each request: the S3 operation it is."""

    daemon_threads = True

    def __init__(self, target: str) -> None:
        u = urlsplit(target)
        self.target = (u.hostname or "127.0.0.1", u.port or 80)
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Forward)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def operations(self) -> collections.Counter[str]:
        ops: collections.Counter[str] = collections.Counter()
        for method, path in self.requests:
            u = urlsplit(path)
            on_key = "/" in u.path.strip("/")
            if method == "GET" and not on_key and parse_qs(u.query).get("list-type") == ["2"]:
                ops["ListObjectsV2"] += 1
            else:
                ops[f"{method} {'object' if on_key else 'bucket'}"] += 1
        return ops


@pytest.fixture()
def proxy(s3: S3) -> Iterator[CountingProxy]:
    server = CountingProxy(s3.endpoint)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def image_prefix(s3: S3) -> str:
    """N_OBJECTS tiny "images" in 50 class folders (the bytes are never read here), uploaded once."""
    prefix = "listing/imgs/"
    keys = [f"{prefix}c{i % 50:02d}/{i:05d}.jpg" for i in range(N_OBJECTS)]
    have = set(s3.keys(prefix))
    client = boto3.client("s3", endpoint_url=s3.endpoint, config=Config(max_pool_connections=32))
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=s3.bucket, Key=k, Body=b"x"),
                      [k for k in keys if k not in have]))
    return f"s3://{s3.bucket}/{prefix.rstrip('/')}"


def _cfg(uri: str, endpoint: str, method: str = "byol") -> PretrainConfig:
    return parse_config({"method": {"name": method}, "data": {"uri": uri}, "s3": {"endpoint_url": endpoint}})


def test_the_pretrain_driver_lists_its_prefix_once(image_prefix: str, proxy: CountingProxy) -> None:
    cfg = _cfg(image_prefix, proxy.url)
    s3 = S3Settings.resolve(cfg.s3.endpoint_url, cfg.s3.region)
    method = get_method(cfg.method.name)
    # what raysl.train.launch runs on the driver before the trainer starts
    listing = method.check_source(cfg, s3)
    files = method.source_files(cfg, s3, listing)
    assert files is not None and len(files) == N_OBJECTS and files == sorted(files)
    assert proxy.operations() == {"ListObjectsV2": math.ceil(N_OBJECTS / 1000)}, proxy.requests


def test_a_prefix_that_matches_nothing_fails_before_any_worker_naming_the_uri(s3: S3, proxy: CountingProxy) -> None:
    uri = f"s3://{s3.bucket}/listing/nothing-here"
    cfg = _cfg(uri, proxy.url)
    with pytest.raises(StorageError, match="listing/nothing-here.* matches nothing"):
        get_method("byol").check_source(cfg, S3Settings.resolve(cfg.s3.endpoint_url))
    assert sum(proxy.operations().values()) <= 3  # one empty listing, then the URI looked up on its own
