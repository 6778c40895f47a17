"""The console's progress line: time formats, ETA from the measured rate, a bar on a terminal and plain
lines elsewhere, the stall hint, the driver-side poller, and the closing summary."""

from __future__ import annotations

import io
import logging

import pytest

from raysl import console
from raysl.console import Progress, eta_seconds, format_duration, format_progress


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class TTYString(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 42, 61, 599.6, 3723)] == ["0:00", "0:42", "1:01", "10:00", "1:02:03"]
    assert format_duration(-5) == "0:00"


def test_eta_comes_from_the_rate_since_the_first_report() -> None:
    assert eta_seconds(10, 100, None, 50.0) is None  # one report: its window holds start-up, no rate yet
    # 20 steps in 40 s since the first report (t=10, step 10) → 2 s a step → 70 steps left = 140 s
    assert eta_seconds(30, 100, (10.0, 10), 50.0) == pytest.approx(140.0)
    assert eta_seconds(100, 100, (10.0, 10), 50.0) == 0.0
    assert eta_seconds(10, 100, (10.0, 10), 50.0) is None  # no step since: no rate


def test_progress_line_format() -> None:
    line = format_progress(40, 100, {"loss": 2.3141, "samples_per_s": 312.4, "lr": 0.1}, 42, 63)
    assert line == "step 40/100  loss 2.314  312 img/s  elapsed 0:42  ETA 1:03"
    assert format_progress(1, 4, {}, 0, None).endswith("ETA ?")
    bar = format_progress(50, 100, {"loss": 1.0}, 10, 10, bar_width=10)
    assert bar.startswith("[#####.....] step 50/100")


def test_plain_lines_when_not_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    clock, out = Clock(), io.StringIO()
    p = Progress(100, stream=out, clock=clock)
    assert not p.tty
    with caplog.at_level(logging.INFO, logger="raysl.progress"):
        clock.t += 30
        p.update({"step": 10, "loss": 3.0, "samples_per_s": 50.0})
        clock.t += 20
        p.update({"step": 20, "loss": 2.5, "samples_per_s": 60.0})
        p.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["step 10/100  loss 3  50 img/s  elapsed 0:30  ETA ?",
                     "step 20/100  loss 2.5  60 img/s  elapsed 0:50  ETA 2:40"]  # 80 steps at 2 s each
    assert out.getvalue() == ""  # nothing drawn outside logging


def test_a_bar_redrawn_in_place_on_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    clock, out = Clock(), TTYString()
    p = Progress(10, stream=out, clock=clock, bar_width=10)
    assert p.tty
    with caplog.at_level(logging.INFO, logger="raysl.progress"):
        for step in (5, 10):
            clock.t += 5
            p.update({"step": step, "loss": 1.0})
        p.close()
    text = out.getvalue()
    assert "\r[#####.....] step 5/10" in text and "\r[##########] step 10/10" in text
    assert text.endswith("\n") and text.count("\n") == 1  # one line, redrawn
    assert not caplog.records


def test_the_bar_clock_moves_between_reports() -> None:
    clock, out = Clock(), TTYString()
    p = Progress(100, stream=out, clock=clock, bar_width=4)
    clock.t += 12
    p.tick()  # before any report: a bar at step 0 whose elapsed time counts
    assert out.getvalue().endswith("\r[....] step 0/100  elapsed 0:12  ETA ?\x1b[K")
    p.update({"step": 10})
    clock.t += 10
    p.update({"step": 20})  # 10 steps in 10 s → ETA 80 s
    clock.t += 30
    p.tick()  # 30 s later, no report: elapsed 0:52, ETA 80 - 30 = 0:50
    assert out.getvalue().endswith("\r[....] step 20/100  elapsed 0:52  ETA 0:50\x1b[K")


def test_stall_hint_once_per_quiet_period(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    p = Progress(10, stream=io.StringIO(), clock=clock, stall_s=60)
    with caplog.at_level(logging.INFO, logger="raysl.progress"):
        clock.t += 59
        p.tick()
        assert not caplog.records
        clock.t += 2
        p.tick()
        p.tick()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no first step for 1:00" in warnings[0].getMessage()
    assert "--verbose" in warnings[0].getMessage()


def test_training_progress_polls_until_the_block_ends(caplog: pytest.LogCaptureFixture) -> None:
    reports = [[{"step": 2, "loss": 1.5}], [], [{"step": 4, "loss": 1.2}]]

    def fetch() -> list[dict[str, float]]:
        return reports.pop(0) if reports else []

    with caplog.at_level(logging.INFO, logger="raysl.progress"):
        with console.training_progress(4, fetch, poll_s=0.01, stream=io.StringIO()) as p:
            import time

            deadline = time.monotonic() + 5
            while reports and time.monotonic() < deadline:
                time.sleep(0.01)
    assert p.step == 4 and p.last["loss"] == 1.2
    assert [r.getMessage().split("  ")[0] for r in caplog.records] == ["step 2/4", "step 4/4"]


def test_a_failing_fetch_does_not_stop_training() -> None:
    def fetch() -> list[dict[str, float]]:
        raise ConnectionError("actor gone")

    with console.training_progress(4, fetch, poll_s=0.01, stream=io.StringIO()) as p:
        pass
    assert p.step == 0


def test_summary_names_model_run_and_checkpoint() -> None:
    text = console.summary(steps=100, seconds=222, metrics={"loss": 2.345}, model="models:/enc@candidate (version 3)",
                           tracking="sqlite:///x.db", run_id="abc", checkpoint="/ckpt/1")
    assert text.splitlines()[0] == "finished 100 steps in 3:42, final loss 2.345"
    assert "models:/enc@candidate (version 3)" in text and "abc at sqlite:///x.db" in text and "/ckpt/1" in text
    assert "not registered" in console.summary(steps=1, seconds=1, metrics={}, model=None, tracking="t",
                                               run_id=None, checkpoint="c")


def test_quiet_by_default_verbose_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RAYSL_VERBOSE", "MLFLOW_LOGGING_LEVEL", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
        monkeypatch.setenv(var, "")  # recorded, so the test leaves the environment as it found it
        monkeypatch.delenv(var)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        console.setup("INFO")
        assert not console.is_verbose()
        assert console.os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
        console.setup("INFO", verbose=True)
        assert console.is_verbose()
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
