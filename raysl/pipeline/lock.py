"""One run of a pipeline at a time: a lock object beside the pipeline's state.

On S3 the lock is taken with a conditional PUT (`If-None-Match: *`): of two runs, exactly one creates it.
The holder refreshes it from a background thread with `If-Match` on its own ETag, so a lock whose holder was
killed goes stale after `ttl` seconds and is taken over (again conditionally: one taker wins). On a local
path the same is done with an exclusive create, and a holder on this host whose process is gone is stale at
once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

from raysl import storage
from raysl.storage import S3Settings, redact

log = logging.getLogger(__name__)


class LockHeld(RuntimeError):
    """Another run of this pipeline holds the lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Backend:
    """create / read / replace / delete of one small object, each conditional where the store allows."""

    def __init__(self, uri: str, s3: S3Settings | None) -> None:
        self.uri, self.s3 = uri, s3
        if storage.is_s3(uri):
            import boto3

            bucket, _, self.key = uri[len("s3://"):].partition("/")
            self.bucket = bucket
            settings = s3 or S3Settings.resolve()
            self.client = boto3.client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region)
        else:
            _, self.path = storage.resolve(uri)

    @staticmethod
    def _precondition(exc: Exception) -> bool:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        return code in ("PreconditionFailed", "ConditionalRequestConflict", "412")

    def create(self, body: bytes) -> str | None:
        """The new ETag, or None when the object already exists."""
        if storage.is_s3(self.uri):
            try:
                return str(self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, IfNoneMatch="*")["ETag"])
            except Exception as exc:
                if self._precondition(exc):
                    return None
                raise
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        return str(os.stat(self.path).st_mtime_ns)

    def read(self) -> tuple[dict[str, Any], str] | None:
        if storage.is_s3(self.uri):
            try:
                obj = self.client.get_object(Bucket=self.bucket, Key=self.key)
            except self.client.exceptions.NoSuchKey:
                return None
            return json.loads(obj["Body"].read()), str(obj["ETag"])
        try:
            with open(self.path, "rb") as f:
                data = f.read()
            return json.loads(data or b"{}"), str(os.stat(self.path).st_mtime_ns)
        except FileNotFoundError:
            return None

    def replace(self, body: bytes, etag: str) -> str | None:
        """Overwrite only if the object still has `etag`; the new ETag, or None when it changed."""
        if storage.is_s3(self.uri):
            try:
                return str(self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, IfMatch=etag)["ETag"])
            except Exception as exc:
                if self._precondition(exc) or "NoSuchKey" in str(exc):
                    return None
                raise
        current = self.read()
        if current is None or current[1] != etag:
            return None
        storage.write_bytes(self.uri, body)
        return str(os.stat(self.path).st_mtime_ns)

    def delete(self) -> None:
        if storage.is_s3(self.uri):
            self.client.delete_object(Bucket=self.bucket, Key=self.key)
        else:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


class PipelineLock:
    """`with PipelineLock(uri, ttl):` — raises LockHeld (naming the holder) if a live run holds it after
    waiting `wait_s` seconds; `lost` turns true if the lock was taken over while held."""

    def __init__(self, uri: str, ttl: float, s3: S3Settings | None = None, wait_s: float = 0.0) -> None:
        self.uri, self.ttl, self.wait_s = uri, ttl, wait_s
        self.backend = _Backend(uri, s3)
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": os.urandom(8).hex()}
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.owner, "heartbeat": time.time(), "ttl": self.ttl}).encode()

    def _stale(self, held: dict[str, Any]) -> str | None:
        age = time.time() - float(held.get("heartbeat", 0))
        if age > float(held.get("ttl", self.ttl)):
            return f"not refreshed for {age:.0f} s"
        if held.get("host") == self.owner["host"] and not _pid_alive(int(held.get("pid", -1))):
            return f"its process {held.get('pid')} on this host is gone"
        return None

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait_s
        while True:
            self.etag = self.backend.create(self._body())
            if self.etag is not None:
                break
            found = self.backend.read()
            if found is None:
                continue  # released between our create and read: try again
            held, etag = found
            why = self._stale(held)
            if why is not None:
                self.etag = self.backend.replace(self._body(), etag)
                if self.etag is not None:
                    log.warning("took over a stale pipeline lock %s (%s)", redact(self.uri), why)
                    break
                continue  # another run took it over first; look again
            if time.monotonic() >= deadline:
                age = time.time() - float(held.get("heartbeat", 0))
                raise LockHeld(f"another run of this pipeline holds {redact(self.uri)} (host {held.get('host')}, "
                               f"pid {held.get('pid')}, refreshed {age:.0f} s ago); it goes stale after "
                               f"{held.get('ttl', self.ttl):.0f} s without a refresh")
            time.sleep(min(5.0, max(0.5, self.wait_s / 20)))
        self._thread = threading.Thread(target=self._beat, name="raysl-pipeline-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(max(1.0, self.ttl / 4)):
            assert self.etag is not None
            try:
                etag = self.backend.replace(self._body(), self.etag)
            except Exception as exc:  # noqa: BLE001 - a blip in storage: keep the lock, try again next beat
                log.warning("could not refresh the pipeline lock: %s", exc)
                continue
            if etag is None:
                self.lost = True
                log.error("the pipeline lock %s was taken over by another run", redact(self.uri))
                return
            self.etag = etag

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if not self.lost:
            found = self.backend.read()
            if found is not None and found[0].get("token") == self.owner["token"]:
                self.backend.delete()

    def __enter__(self) -> PipelineLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
