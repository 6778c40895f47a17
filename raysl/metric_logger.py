"""Metrics and pictures from the training loop to MLflow, sent from a background thread.

`log()` only appends to an in-memory buffer, so training never waits on the network. In an MLflow outage the
metric values stay buffered (at most `max_buffered`; when full the oldest are dropped and counted) and the
thread probes MLflow at most every `backoff_s`; once it answers, the backlog is sent in the order it was
logged (step order) before anything newer. Each value keeps the timestamp of its `log()` call, so a batch
resent after a reply was lost is recognised by MLflow's store as the same metric. A metric MLflow refuses
(HTTP 400: an invalid key, say) is dropped and counted, so it cannot stall what follows. Pictures are not kept:
one that arrives or is due during an outage is dropped (and counted). `close(timeout)` keeps trying to flush
(every second at most) until `timeout` and then warns how many values were lost.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raysl.tracking import client as _client
from raysl.tracking import log_png

log = logging.getLogger(__name__)

BATCH = 250  # values per log_batch call (MLflow allows 1000): a replayed backlog goes in calls short enough
# for a loaded server to answer within the client's HTTP timeout (1000 took > 10 s on a busy SQLite server)
MAX_PICTURES = 8  # pictures waiting to be drawn and sent; beyond this, new ones are dropped


@dataclass(frozen=True)
class _Value:
    key: str
    value: float
    timestamp_ms: int
    step: int


@dataclass
class _Picture:
    """A picture for the background thread to draw (`make_png` returns PNG bytes) and upload."""

    make_png: Callable[[], bytes]
    artifact_file: str


def _rejected(exc: Exception) -> bool:
    """MLflow answered and refused the request (HTTP 400: invalid key, value or run state), which no retry fixes;
    anything else (no answer, 5xx, a timeout) is an outage to wait out."""
    status = getattr(exc, "get_http_status_code", None)
    return callable(status) and status() == 400


class MetricLogger:
    """Sends metrics and pictures to the MLflow run `run_id` from a background thread; buffers metrics through an
    outage and replays them once MLflow is back (see the module docstring). `client` replaces the MlflowClient
    built from `uri` (tests inject a fake one). `dropped` counts metric values lost (buffer full, or still unsent
    at `close`), `dropped_pictures` the pictures lost."""

    def __init__(self, uri: str | None, run_id: str | None, max_buffered: int = 10_000, backoff_s: float = 5.0,
                 client: Any | None = None) -> None:
        self.enabled = bool(run_id and (uri or client is not None))
        self.run_id = run_id
        self.max_buffered = max(1, max_buffered)
        self.backoff_s = backoff_s
        self.dropped = 0
        self.dropped_pictures = 0
        self.sent = 0
        self._inflight = 0  # values taken out of the buffer for the log_batch call in progress
        self._refused_keys: set[str] = set()
        self._buf: deque[_Value] = deque()
        self._pictures: deque[_Picture] = deque()
        self._lock = threading.Lock()  # guards the buffers and counters; never held across a network call
        self._wake = threading.Event()  # something new was logged, or close() was called
        self._closing = threading.Event()
        self._give_up = threading.Event()  # close()'s deadline passed: stop after the call in flight
        self._deadline = math.inf
        self._outage_since: float | None = None
        self._thread: threading.Thread | None = None
        if self.enabled:
            self._client = client if client is not None else _client(str(uri))
            self._thread = threading.Thread(target=self._run, name="raysl-mlflow", daemon=True)
            self._thread.start()

    @property
    def buffered(self) -> int:
        """Metric values waiting to be sent."""
        with self._lock:
            return len(self._buf)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Buffer `metrics` for `step` (non-finite values are skipped: MLflow rejects them); never blocks."""
        if not self.enabled:
            return
        ts = int(time.time() * 1000)
        values = [_Value(k, float(v), ts, int(step)) for k, v in metrics.items() if math.isfinite(float(v))]
        with self._lock:
            self._buf.extend(values)
            self._trim()
        self._wake.set()

    def log_image(self, make_png: Callable[[], bytes], artifact_file: str) -> None:
        """Queue a picture: a callable returning PNG bytes (run on the background thread) → `artifact_file`."""
        if not self.enabled:
            return
        with self._lock:
            if len(self._pictures) >= MAX_PICTURES:
                self.dropped_pictures += 1
                return
            self._pictures.append(_Picture(make_png, artifact_file))
        self._wake.set()

    def _trim(self) -> None:
        """Drop the oldest values beyond the bound (the caller holds the lock)."""
        over = len(self._buf) - self.max_buffered
        if over > 0:
            for _ in range(over):
                self._buf.popleft()
            self.dropped += over

    def _post(self, values: list[_Value]) -> None:
        from mlflow.entities import Metric

        self._client.log_batch(self.run_id, metrics=[Metric(v.key, v.value, v.timestamp_ms, v.step) for v in values])

    def _post_rejected(self, chunk: list[_Value], exc: Exception) -> int:
        """MLflow refused `chunk` (a bad key, say): send it key by key so one bad key does not take the others
        with it, and drop what is refused (retrying it would stall the buffer forever). Keys of the chunk that
        went through before an outage are sent again with the chunk; MLflow keeps one copy (same timestamp).
        Returns how many values were dropped."""
        by_key: dict[str, list[_Value]] = {}
        for v in chunk:
            by_key.setdefault(v.key, []).append(v)
        if len(by_key) == 1:  # one key in the chunk: that key is what MLflow refused
            return self._refuse(chunk[0].key, len(chunk), exc)
        refused = 0
        for key, values in by_key.items():
            try:
                self._post(values)
            except Exception as err:
                if not _rejected(err):
                    raise
                refused += self._refuse(key, len(values), err)
        return refused

    def _refuse(self, key: str, n: int, exc: Exception) -> int:
        if key not in self._refused_keys:  # once per key, not once per step
            self._refused_keys.add(key)
            log.warning("MLflow refused metric %r; its values are dropped: %s", key, exc)
        return n

    def _send_metrics(self) -> None:
        """Send the buffer front to back in batches; on failure, put the batch back in front and raise."""
        while True:
            with self._lock:
                chunk = [self._buf.popleft() for _ in range(min(BATCH, len(self._buf)))]
                self._inflight = len(chunk)
            if not chunk:
                return
            refused = 0
            try:
                try:
                    self._post(chunk)
                except Exception as exc:
                    if not _rejected(exc):
                        raise
                    refused = self._post_rejected(chunk, exc)
            except Exception:
                with self._lock:  # back in front, oldest first; what no longer fits is the oldest, dropped
                    self._inflight = 0
                    self._buf.extendleft(reversed(chunk))
                    self._trim()
                raise
            with self._lock:
                self._inflight = 0
                self.sent += len(chunk) - refused
                self.dropped += refused

    def _send_pictures(self) -> None:
        while True:
            with self._lock:
                if not self._pictures:
                    return
                pic = self._pictures.popleft()
            try:
                png = pic.make_png()
            except Exception as exc:  # noqa: BLE001 - a picture that cannot be drawn is not an MLflow outage
                log.warning("could not draw %s: %s", pic.artifact_file, exc)
                continue
            try:
                log_png(self._client, str(self.run_id), png, pic.artifact_file)
            except Exception:
                with self._lock:
                    self.dropped_pictures += 1
                raise

    def _attempt(self) -> bool:
        """One try at sending everything waiting; True when nothing is left. Pictures go after the metrics, and
        are dropped rather than kept when MLflow does not answer."""
        try:
            self._send_metrics()
            self._send_pictures()
        except Exception as exc:  # noqa: BLE001 - an outage must never reach the training loop
            with self._lock:
                self.dropped_pictures += len(self._pictures)
                self._pictures.clear()
                waiting = len(self._buf)
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                log.warning("MLflow unavailable, buffering metrics (%d waiting, at most %d kept) and retrying "
                            "every %g s: %s", waiting, self.max_buffered, self.backoff_s, exc)
            return False
        if self._outage_since is not None and not self._give_up.is_set():
            log.warning("MLflow is back after %.0f s; the buffered metrics were sent (%d values dropped so far)",
                        time.monotonic() - self._outage_since, self.dropped)
            self._outage_since = None
        return True

    def _run(self) -> None:
        retry_at = 0.0
        while not self._closing.is_set():
            self._wake.wait(None if self._outage_since is None else max(0.0, retry_at - time.monotonic()))
            self._wake.clear()
            if self._closing.is_set():
                break
            if self._outage_since is not None and time.monotonic() < retry_at:
                continue  # backing off: what was logged waits in the buffer
            if not self._attempt():
                retry_at = time.monotonic() + self.backoff_s
        # closing: flush what is left until close()'s deadline, probing every second at most (the wait is short
        # and bounded, and a server back a moment after training ended should still get the tail)
        while not self._give_up.is_set() and not self._attempt():
            left = self._deadline - time.monotonic()
            if left <= 0 or self._give_up.wait(min(self.backoff_s, 1.0, left)):
                return

    def close(self, timeout: float = 30.0) -> None:
        """Flush what is buffered within `timeout` seconds, then stop; warns how many values were lost."""
        if self._thread is None:
            return
        self.enabled = False  # what is logged after this would have no one to send it
        self._deadline = time.monotonic() + timeout
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout)
        self._give_up.set()  # a call still in flight may yet finish, but no new attempt starts
        self._thread = None
        with self._lock:  # a batch still in flight is counted lost: unconfirmed when we stop waiting
            lost = len(self._buf) + self._inflight
            self._buf.clear()
            self.dropped += lost
            pictures = len(self._pictures)
            self.dropped_pictures += pictures
            self._pictures.clear()
        if lost or self.dropped or self.dropped_pictures:
            log.warning("MLflow logging closed: %d metric values lost (%d not confirmed sent within %g s), "
                        "%d pictures lost", self.dropped, lost, timeout, self.dropped_pictures)
