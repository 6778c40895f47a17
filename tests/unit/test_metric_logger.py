"""MetricLogger through an MLflow outage: logging never waits, buffered metrics arrive once and in order when
MLflow answers again, the buffer is bounded and counts what it dropped, close() gives up in time."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import mlflow.entities  # noqa: F401 - imported up front so its first import (about 1 s) skews no timing
import pytest

from raysl.metric_logger import MetricLogger


class Refused(Exception):
    """What MlflowException says about a request MLflow refused."""

    def get_http_status_code(self) -> int:
        return 400


class FakeMlflow:
    """A client whose log_batch fails (slowly, like a timeout) while `down` is set and records what it took."""

    def __init__(self, down: bool = True, fail_delay_s: float = 0.05) -> None:
        self.down = threading.Event()
        if down:
            self.down.set()
        self.fail_delay_s = fail_delay_s
        self.received: list[tuple[str, float, int, int]] = []  # (key, value, step, timestamp)
        self.attempted_ts: dict[tuple[str, int], int] = {}
        self.calls: list[float] = []
        self.artifacts: list[str] = []

    def log_batch(self, run_id: str, metrics: list[Any]) -> None:
        assert run_id == "run"
        self.calls.append(time.monotonic())
        for m in metrics:
            self.attempted_ts.setdefault((m.key, m.step), m.timestamp)
        if self.down.is_set():
            time.sleep(self.fail_delay_s)
            raise ConnectionError("MLflow is down")
        if any(" " in m.key for m in metrics):  # as MLflow answers an invalid name: HTTP 400, nothing stored
            raise Refused(f"Invalid value {metrics[0].key!r} for parameter 'metrics[0].name'")
        self.received.extend((m.key, m.value, m.step, m.timestamp) for m in metrics)

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        if self.down.is_set():
            raise ConnectionError("MLflow is down")
        self.artifacts.append(f"{artifact_path}/{path.rsplit('/', 1)[-1]}")


def _wait_for(cond: Any, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_metrics_logged_in_an_outage_arrive_once_in_order(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeMlflow(down=True)
    logger = MetricLogger(None, "run", backoff_s=0.3, client=fake)
    t0 = time.perf_counter()
    for step in range(1, 1501):  # 3000 values: several log_batch calls to replay
        logger.log({"loss": 1.0 / step, "lr": step * 1e-4}, step)
        if step % 500 == 0:
            time.sleep(0.2)  # the outage lasts a while, with the thread probing
    assert time.perf_counter() - t0 < 1.5  # 0.6 s of those are the sleeps: log() never waited on the client
    assert fake.received == []
    outage = time.monotonic()
    time.sleep(0.5)
    fake.down.clear()
    back = time.monotonic()
    _wait_for(lambda: len(fake.received) == 3000)
    assert time.monotonic() - back < 1.5  # flushed about one back-off (0.3 s) after MLflow answers
    logger.log({"loss": 0.0}, 1501)  # after the outage, new values go straight through
    logger.close(timeout=5)
    expected = [(k, step) for step in range(1, 1501) for k in ("loss", "lr")] + [("loss", 1501)]
    assert [(k, step) for k, _, step, _ in fake.received] == expected  # each exactly once, in step order
    assert fake.received[0][1] == 1.0 and fake.received[-2][1] == pytest.approx(0.15)
    # a value resent after a failed call keeps the timestamp of its log() call (MLflow dedupes on it)
    assert all(fake.attempted_ts[(k, step)] == ts for k, _, step, ts in fake.received)
    probes = [c for c in fake.calls if outage <= c < back]
    assert 1 <= len(probes) <= 0.5 / 0.3 + 2  # probed at most every back-off, not in a loop
    assert logger.dropped == 0 and logger.sent == 3001
    messages = [r.getMessage() for r in caplog.records]
    assert sum("MLflow unavailable" in m for m in messages) == 1 and any("MLflow is back" in m for m in messages)
    assert not any("lost" in m for m in messages)


def test_buffer_is_bounded_and_drops_the_oldest(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeMlflow(down=True, fail_delay_s=0.0)
    logger = MetricLogger(None, "run", max_buffered=100, backoff_s=0.2, client=fake)
    for step in range(30):
        logger.log({f"m{i}": float(step) for i in range(5)}, step)  # 150 values
    # the newest 100 wait, the 50 that no longer fitted are counted (a batch in flight is neither, so wait)
    _wait_for(lambda: len(fake.calls) >= 1 and logger.buffered == 100 and logger.dropped == 50)
    fake.down.clear()
    logger.close(timeout=5)
    steps = [step for _, _, step, _ in fake.received]
    assert len(fake.received) == 100 and steps == sorted(steps) and steps[0] == 10  # the newest 100 kept
    assert logger.dropped == 50
    assert any("50 metric values lost" in r.getMessage() for r in caplog.records)


def test_close_flushes_when_mlflow_returns_before_the_timeout() -> None:
    fake = FakeMlflow(down=True, fail_delay_s=0.0)
    logger = MetricLogger(None, "run", backoff_s=0.2, client=fake)
    for step in range(10):
        logger.log({"loss": float(step)}, step)
    threading.Timer(0.5, fake.down.clear).start()
    logger.close(timeout=5)
    assert [step for _, _, step, _ in fake.received] == list(range(10)) and logger.dropped == 0


def test_close_gives_up_at_its_timeout_and_says_how_many_were_lost(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeMlflow(down=True, fail_delay_s=0.05)
    logger = MetricLogger(None, "run", backoff_s=0.2, client=fake)
    for step in range(10):
        logger.log({"loss": float(step), "acc": 0.5}, step)
    t0 = time.monotonic()
    logger.close(timeout=1.0)
    assert time.monotonic() - t0 < 1.5
    assert logger.dropped == 20 and fake.received == []
    assert len([c for c in fake.calls if c >= t0]) >= 3  # it kept trying within the timeout
    assert any("20 metric values lost" in r.getMessage() for r in caplog.records)
    logger.log({"loss": 1.0}, 99)  # after close: ignored, no error


def test_pictures_are_dropped_in_an_outage_and_metrics_are_kept() -> None:
    fake = FakeMlflow(down=True, fail_delay_s=0.0)
    logger = MetricLogger(None, "run", backoff_s=0.2, client=fake)
    logger.log({"loss": 1.0}, 1)
    logger.log_image(lambda: b"\x89PNG", "augmentations/first_batch.png")
    _wait_for(lambda: logger.dropped_pictures == 1)
    fake.down.clear()
    logger.log_image(lambda: b"\x89PNG", "figures/later.png")
    logger.close(timeout=5)
    assert [(k, step) for k, _, step, _ in fake.received] == [("loss", 1)]
    assert fake.artifacts == ["figures/later.png"] and logger.dropped_pictures == 1


def test_non_finite_values_are_skipped_and_a_disabled_logger_does_nothing() -> None:
    fake = FakeMlflow(down=False)
    logger = MetricLogger(None, "run", client=fake)
    logger.log({"loss": float("nan"), "lr": 0.1, "grad": float("inf")}, 3)
    logger.close(timeout=5)
    assert [(k, v, s) for k, v, s, _ in fake.received] == [("lr", 0.1, 3)]
    off = MetricLogger(None, None)
    off.log({"loss": 1.0}, 1)
    off.close()
    assert not off.enabled and off.dropped == 0


def test_logging_while_the_client_hangs_never_blocks(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    fake = FakeMlflow(down=True, fail_delay_s=2.0)  # every call hangs 2 s before failing
    logger = MetricLogger(None, "run", backoff_s=0.1, client=fake)
    t0 = time.perf_counter()
    for step in range(2000):
        logger.log({"loss": 1.0}, step)
    assert time.perf_counter() - t0 < 0.5
    logger.close(timeout=0.5)
    assert logger.dropped == 2000  # the batch in flight is unconfirmed, so counted lost with the rest


def test_a_metric_mlflow_refuses_is_dropped_without_stalling_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeMlflow(down=True, fail_delay_s=0.0)
    logger = MetricLogger(None, "run", backoff_s=0.2, client=fake)
    for step in range(5):  # buffered through an outage, so the bad key shares batches with good ones
        logger.log({"loss": float(step), "bad key": 1.0, "lr": 0.1}, step)
    fake.down.clear()
    _wait_for(lambda: logger.buffered == 0)
    logger.log({"bad key": 2.0}, 5)  # a batch of the bad key alone
    logger.log({"loss": 5.0}, 6)
    logger.close(timeout=5)
    got = sorted((step, k) for k, _, step, _ in fake.received)
    assert got == sorted([(s, k) for s in range(5) for k in ("loss", "lr")] + [(6, "loss")])
    assert logger.dropped == 6 and logger.sent == 11
    assert sum("refused metric 'bad key'" in r.getMessage() for r in caplog.records) == 1  # once, not per step
