"""Metrics and pictures from the training loop to MLflow, sent from a background thread: an MLflow outage
drops them with a warning and never blocks or kills training."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from raysl.tracking import client as _client
from raysl.tracking import log_png

log = logging.getLogger(__name__)


@dataclass
class _Picture:
    """A picture for the background thread to draw (`make_png` returns PNG bytes) and upload."""

    make_png: Callable[[], bytes]
    artifact_file: str


class MetricLogger:
    """Sends metrics and pictures from a background thread; when MLflow is down, warns and drops instead of
    blocking (a picture is encoded there too, so the training loop only hands it over)."""

    def __init__(self, uri: str | None, run_id: str | None, max_queue: int = 10_000,
                 backoff_s: float = 30.0) -> None:
        self.enabled = bool(uri and run_id)
        self.backoff_s = backoff_s
        self.run_id = run_id
        self.dropped = 0
        self._q: queue.Queue[tuple[dict[str, float], int, int] | _Picture | None] = queue.Queue(max_queue)
        self._thread: threading.Thread | None = None
        if self.enabled:
            self._client = _client(str(uri))
            self._thread = threading.Thread(target=self._run, name="raysl-mlflow", daemon=True)
            self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        try:
            self._q.put_nowait((dict(metrics), step, int(time.time() * 1000)))
        except queue.Full:
            self.dropped += 1

    def log_image(self, make_png: Callable[[], bytes], artifact_file: str) -> None:
        """Queue a picture: a callable returning PNG bytes (run on the background thread) → `artifact_file`."""
        if not self.enabled:
            return
        try:
            self._q.put_nowait(_Picture(make_png, artifact_file))
        except queue.Full:
            self.dropped += 1

    def _send(self, item: tuple[dict[str, float], int, int] | _Picture) -> None:
        from mlflow.entities import Metric

        if isinstance(item, _Picture):
            try:
                png = item.make_png()
            except Exception as exc:  # noqa: BLE001 - a picture that cannot be drawn is not an MLflow outage
                log.warning("could not draw %s: %s", item.artifact_file, exc)
                return
            log_png(self._client, str(self.run_id), png, item.artifact_file)
            return
        metrics, step, ts = item
        ms = [Metric(k, float(v), ts, step) for k, v in metrics.items() if np.isfinite(v)]
        self._client.log_batch(self.run_id, metrics=ms)

    def _run(self) -> None:
        retry_at = 0.0  # during an outage, drop without trying until this time, so the queue never backs up
        while True:
            item = self._q.get()
            if item is None:
                return
            if time.monotonic() < retry_at:
                self.dropped += 1
                continue
            try:
                self._send(item)
                if retry_at:
                    log.warning("MLflow is back; %d metric batches were dropped", self.dropped)
                retry_at = 0.0
            except Exception as exc:  # noqa: BLE001 - an outage must never reach the training loop
                self.dropped += 1
                if not retry_at:
                    log.warning("MLflow unavailable, dropping metrics for %.0f s at a time: %s",
                                self.backoff_s, exc)
                retry_at = time.monotonic() + self.backoff_s

    def close(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout)
