"""One holder at a time of a named thing (a pipeline, a training config): a small lock object in storage.

On S3 the lock is taken with a conditional PUT (`If-None-Match: *`): of two runs, exactly one creates it.
The holder refreshes it from a background (daemon) thread with `If-Match` on its own ETag, so a lock whose
holder was killed goes stale after `ttl` seconds and is taken over (again conditionally: one taker wins).
On a local path the same is done with an exclusive create, and a holder on this host whose process is gone
is stale at once. The lock's body names its holder: host, pid, start time, last heartbeat and ttl.
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
    """Another live holder has the lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _when(epoch: Any) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(epoch)))
    except (TypeError, ValueError):
        return "an unknown time"


def describe(held: dict[str, Any]) -> str:
    """A holder as people read it: "host/pid 123 since 2025-01-01T10:00:00Z (refreshed 3 s ago, ttl 600 s)"."""
    age = time.time() - float(held.get("heartbeat", 0) or 0)
    ttl = held.get("ttl")
    ttl_text = f"{float(ttl):.0f} s" if isinstance(ttl, (int, float)) else "unknown"
    return (f"{held.get('host', '?')}/pid {held.get('pid', '?')} since {_when(held.get('started'))} "
            f"(refreshed {age:.0f} s ago, ttl {ttl_text})")


class _Backend:
    """create / read / replace / delete of one small object, each conditional where the store allows."""

    def __init__(self, uri: str, s3: S3Settings | None) -> None:
        self.uri, self.s3 = uri, s3
        if storage.is_s3(uri):
            import boto3

            bucket, _, self.key = storage.s3_path(uri).partition("/")
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
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        try:
            body = json.loads(data)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            # a holder between its exclusive create and its write (or a torn file): it counts as refreshed
            # when the file was last written, so it is not taken over the moment it appears
            body = {"heartbeat": stat.st_mtime}
        return body, str(stat.st_mtime_ns)

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


def held_by(uri: str, s3: S3Settings | None = None) -> dict[str, Any] | None:
    """The body of the lock at `uri` (host, pid, started, heartbeat, ttl), or None when nobody holds it."""
    found = _Backend(uri, s3).read()
    return None if found is None else found[0]


class RunLock:
    """`with RunLock(uri, ttl):` — raises LockHeld (naming the holder) if a live holder has it after waiting
    `wait_s` seconds; `lost` turns true if the lock was taken over while held. `what` names the holder in
    messages ("another run of this pipeline holds …")."""

    what = "run"

    def __init__(self, uri: str, ttl: float, s3: S3Settings | None = None, wait_s: float = 0.0,
                 what: str | None = None) -> None:
        self.uri, self.ttl, self.wait_s = uri, ttl, wait_s
        if what is not None:
            self.what = what
        self.backend = _Backend(uri, s3)
        self.owner: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(),
                                      "token": os.urandom(8).hex(), "started": time.time()}
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.owner, "heartbeat": time.time(), "ttl": self.ttl}).encode()

    def _stale(self, held: dict[str, Any]) -> str | None:
        age = time.time() - float(held.get("heartbeat", 0) or 0)
        if age > float(held.get("ttl", self.ttl)):
            return f"not refreshed for {age:.0f} s"
        if held.get("host") == self.owner["host"] and "pid" in held and not _pid_alive(int(held["pid"])):
            return f"its process {held['pid']} on this host is gone"
        return None

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait_s
        self.owner["started"] = time.time()
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
                    log.warning("took over a stale lock %s from %s (%s)", redact(self.uri), describe(held), why)
                    break
                continue  # another taker won; look again
            if time.monotonic() >= deadline:
                raise LockHeld(f"another {self.what} holds {redact(self.uri)}: held by {describe(held)}; "
                               f"it goes stale after {float(held.get('ttl', self.ttl)):.0f} s without a refresh")
            time.sleep(min(5.0, max(0.5, self.wait_s / 20)))
        self.lost = False
        self._stop.clear()
        # a daemon: a holder that dies without release() must not be kept alive by its own heartbeat
        self._thread = threading.Thread(target=self._beat, name="raysl-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(max(1.0, self.ttl / 4)):
            assert self.etag is not None
            try:
                etag = self.backend.replace(self._body(), self.etag)
            except Exception as exc:  # noqa: BLE001 - a blip in storage: keep the lock, try again next beat
                log.warning("could not refresh the lock %s: %s", redact(self.uri), exc)
                continue
            if etag is None:
                self.lost = True
                log.error("the lock %s was taken over by another %s", redact(self.uri), self.what)
                return
            self.etag = etag

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if not self.lost:
            found = self.backend.read()
            if found is not None and found[0].get("token") == self.owner["token"]:
                self.backend.delete()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
