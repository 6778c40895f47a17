"""What a person sees on the console: raysl's own lines; Ray's output only with --verbose.

By default a run prints raysl's log lines, one progress line per log interval (a redrawn bar when
stderr is a terminal) and a closing summary. Ray's own console output goes to files instead: its
driver-side log records to `raysl-driver.log` in the Ray session's log folder, worker and actor
output to Ray's per-process logs there (`ray.init(log_to_driver=False)`), and Ray Data's progress
bars are switched off (see `raysl.train.launch.init_ray`). `--verbose` (or RAYSL_VERBOSE=1) brings
all of it back. Human-readable lines go to stderr, so stdout stays free for a command's result
(`raysl pretrain` prints JSON there).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from threading import Event, Thread
from typing import IO, Any

from raysl.storage import RedactingFilter, redact_exc

log = logging.getLogger("raysl.progress")
_VERBOSE_ENV = "RAYSL_VERBOSE"
# Ray's driver-side records before its session folder exists (the token notice is printed during
# ray.init); written to the file once Ray is up.
_EARLY = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
_EARLY.setLevel(logging.INFO)
_state: dict[str, Any] = {"bar": None, "log_dir": None}


def is_verbose() -> bool:
    return os.environ.get(_VERBOSE_ENV, "") not in ("", "0", "false")


class _Formatter(logging.Formatter):
    """`12:03:41 message`; the level for warnings and errors; the logger's name at DEBUG."""

    def __init__(self, debug: bool) -> None:
        super().__init__(datefmt="%H:%M:%S")
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname} " if record.levelno >= logging.WARNING else ""
        name = f"{record.name}: " if self.debug else ""
        self._style._fmt = f"%(asctime)s {level}{name}%(message)s"
        return super().format(record)


class _ConsoleHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stderr handler that lifts a drawn progress bar out of the way of a log line, then redraws it."""

    def emit(self, record: logging.LogRecord) -> None:
        bar: Progress | None = _state["bar"]
        if bar is not None and bar.tty:
            bar.clear()
        super().emit(record)
        if bar is not None and bar.tty:
            bar.redraw()


def setup(level: str = "INFO", *, verbose: bool = False) -> None:
    """Console logging for the `raysl` command; `verbose` also lets Ray and MLflow print as they do by default."""
    if verbose:
        os.environ[_VERBOSE_ENV] = "1"
    handler = _ConsoleHandler(sys.stderr)
    handler.setFormatter(_Formatter(debug=level == "DEBUG"))
    handler.addFilter(RedactingFilter())  # Ray's, MLflow's and pyarrow's lines too: raysl formats only its own
    logging.basicConfig(level=getattr(logging, level), handlers=[handler], force=True)
    if not is_verbose():
        # MLflow's INFO lines (database migrations, signature inference) and its download bars are noise
        # on a training console; their warnings stay.
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _not_bars_off(record: logging.LogRecord) -> bool:
    """Ray Data warns that its bars are off, which raysl did on purpose; the rest of its warnings pass."""
    return not str(record.msg).startswith("Progress bars disabled")


def quiet_ray() -> None:
    """Before ray.init: Ray's driver-side console handlers keep only errors; the rest is kept for the log file."""
    if is_verbose():
        return
    import ray  # noqa: F401 - importing ray (and ray.data) installs the handlers adjusted here
    import ray.data  # noqa: F401

    # Ray Data's warnings stay: on the driver they are about this run's pipeline (e.g. "Cluster resources are
    # not enough to run any task", the only sign of a starved pipeline). Ray core's go to the file.
    for name, level in (("ray", logging.ERROR), ("ray.data", logging.WARNING)):
        for h in logging.getLogger(name).handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(max(h.level, level))
                h.addFilter(_not_bars_off)
    if _EARLY not in logging.getLogger("ray").handlers:
        logging.getLogger("ray").addHandler(_EARLY)


def ray_started(session_dir: str | None) -> Path | None:
    """After ray.init: Ray's and raysl's driver records go to `<session>/logs/raysl-driver.log` too."""
    ray_log = logging.getLogger("ray")
    if not session_dir or is_verbose():
        ray_log.removeHandler(_EARLY)
        return None
    log_dir = Path(session_dir) / "logs"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_dir / "raysl-driver.log", encoding="utf-8")
    except OSError:  # a read-only or remote session folder: the console is all there is
        ray_log.removeHandler(_EARLY)
        return None
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    fh.setLevel(logging.INFO)
    fh.addFilter(RedactingFilter())
    _EARLY.setTarget(fh)
    _EARLY.flush()
    ray_log.removeHandler(_EARLY)
    for lg in (ray_log, logging.getLogger()):
        lg.addHandler(fh)
    _state["log_dir"] = log_dir
    return log_dir


def log_dir() -> Path | None:
    """Where this process's Ray session keeps its logs (worker output included), once Ray is up."""
    return _state["log_dir"]  # type: ignore[no-any-return]


def format_duration(seconds: float) -> str:
    """0:42, 12:03, 1:02:03."""
    s = max(int(round(seconds)), 0)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def eta_seconds(step: int, total: int, first: tuple[float, int] | None, now: float) -> float | None:
    """Seconds left, at the rate measured since the first progress report (time, step) up to `now`.

    The first report cannot give a rate: its window holds worker start-up and the data pipeline's warm-up.
    """
    if first is None:
        return None
    t_first, step_first = first
    if step <= step_first or now <= t_first:
        return None
    return (total - step) * (now - t_first) / (step - step_first)


def format_progress(step: int, total: int, metrics: Mapping[str, float], elapsed: float, eta: float | None,
                    *, bar_width: int = 0) -> str:
    """`step 40/100  loss 2.31  312 img/s  elapsed 0:42  ETA 1:03`; with `bar_width`, a bar in front."""
    parts = [f"step {step}/{total}"]
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4g}")
    if "samples_per_s" in metrics:
        parts.append(f"{metrics['samples_per_s']:.0f} img/s")
    if "knn_top1" in metrics:
        parts.append(f"kNN {metrics['knn_top1']:.1%}")
    parts += [f"elapsed {format_duration(elapsed)}", f"ETA {format_duration(eta) if eta is not None else '?'}"]
    line = "  ".join(parts)
    if bar_width:
        done = int(bar_width * min(max(step / max(total, 1), 0.0), 1.0))
        line = f"[{'#' * done}{'.' * (bar_width - done)}] {line}"
    return line


class Progress:
    """The driver's view of a training run: fed the metrics rank 0 reports, prints one line per report
    (or redraws one bar on a terminal), and says where to look when nothing has arrived for a while."""

    def __init__(self, total: int, *, stream: IO[str] | None = None, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic, stall_s: float = 600.0, bar_width: int = 24) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(self.stream.isatty()) if tty is None else tty
        self.clock = clock
        self.stall_s = stall_s
        self.bar_width = bar_width
        self.t0 = clock()
        self.first: tuple[float, int] | None = None
        self.last: dict[str, float] = {}
        self.step = 0
        self._line = ""
        self._quiet_since = self.t0
        self._eta: tuple[float, float | None] = (self.t0, None)  # (when reported, seconds left then)

    @property
    def elapsed(self) -> float:
        return self.clock() - self.t0

    def update(self, metrics: Mapping[str, Any]) -> None:
        if "step" not in metrics:  # a report that is not progress (a run that stops says why itself)
            return
        now = self.clock()
        step = int(metrics.get("step", self.step))
        self.last = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        eta = eta_seconds(step, self.total, self.first, now)
        if self.first is None:
            self.first = (now, step)
        self.step, self._quiet_since, self._eta = step, now, (now, eta)
        if self.tty:
            self._draw(now)
        else:
            log.info("%s", format_progress(step, self.total, self.last, now - self.t0, eta))

    def _draw(self, now: float) -> None:
        """Redraw the bar with the clock moving: elapsed counts up, the ETA down from the last report's."""
        t_report, eta = self._eta
        left = None if eta is None else max(eta - (now - t_report), 0.0)
        self._line = format_progress(self.step, self.total, self.last, now - self.t0, left, bar_width=self.bar_width)
        self.redraw()

    def tick(self) -> None:
        """Called while waiting: on a terminal the bar's clock moves; a hint once per `stall_s` without a report."""
        now = self.clock()
        if self.tty:
            self._draw(now)
        if now - self._quiet_since < self.stall_s:
            return
        self._quiet_since = now
        where = f"Ray's worker logs are in {log_dir()}" if log_dir() else "Ray's worker logs are in its session folder"
        what = "first step" if self.first is None else f"progress since step {self.step}"
        log.warning("no %s for %s; %s (or rerun with --verbose to see them here)", what,
                    format_duration(self.stall_s), where)

    def clear(self) -> None:
        if self._line:
            self.stream.write("\r\x1b[K")

    def redraw(self) -> None:
        if self._line:
            self.stream.write(f"\r{self._line}\x1b[K")
            self.stream.flush()

    def close(self) -> None:
        if self.tty and self._line:
            self.stream.write("\n")
            self.stream.flush()
            self._line = ""


@contextmanager
def training_progress(total: int, fetch: Callable[[], list[dict[str, Any]]], *, poll_s: float = 0.5,
                      stream: IO[str] | None = None) -> Iterator[Progress]:
    """Show progress while the block runs (it blocks on training): a thread polls `fetch` for reports."""
    progress = Progress(total, stream=stream)
    stop = Event()

    def drain() -> None:
        try:
            reports = fetch()
        except Exception as exc:  # noqa: BLE001 - progress is a courtesy; training decides success
            logging.getLogger(__name__).debug("progress fetch failed: %s", redact_exc(exc))
            return
        for metrics in reports:
            progress.update(metrics)

    def poll() -> None:
        while not stop.wait(poll_s):
            drain()
            progress.tick()

    _state["bar"] = progress
    thread = Thread(target=poll, name="raysl-progress", daemon=True)
    thread.start()
    try:
        yield progress
    finally:
        stop.set()
        thread.join(5)
        drain()
        progress.close()
        _state["bar"] = None


class _Mailbox:
    """Holds rank 0's reports until the driver collects them; runs as a Ray actor (see train_reports)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def put(self, item: dict[str, Any]) -> None:
        self.items.append(item)

    def take(self) -> list[dict[str, Any]]:
        out, self.items = self.items, []
        return out


def train_reports() -> tuple[Any, Callable[[], list[dict[str, Any]]]]:
    """A Ray Train callback that forwards what rank 0 reports to this driver, and the function that collects it.

    The callback runs in the Train controller after every `ray.train.report`; it drops each report in a small
    actor, so progress reaches the driver without forwarding worker logs (log_to_driver stays off).
    """
    import ray
    from ray.train import UserCallback

    box: Any = ray.remote(num_cpus=0)(_Mailbox).remote()

    class ForwardReports(UserCallback):  # type: ignore[misc]
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics:
                box.put.remote(dict(metrics[0]))  # fire and forget: never stall the controller

    return ForwardReports(), lambda: list(ray.get(box.take.remote(), timeout=10))


def summary(*, steps: int, seconds: float, metrics: Mapping[str, float], model: str | None, tracking: str,
            run_id: str | None, checkpoint: str) -> str:
    """The closing lines of a pretraining run: what was trained, where the model and its logs are."""
    loss = f", final loss {metrics['loss']:.4g}" if "loss" in metrics else ""
    rows = [f"finished {steps} steps in {format_duration(seconds)}{loss}",
            f"  model       {model or 'not registered (MLflow unavailable); the encoder is in the checkpoint'}",
            f"  MLflow run  {run_id or '-'} at {tracking}",
            f"  checkpoint  {checkpoint}"]
    if log_dir() is not None:
        rows.append(f"  Ray logs    {log_dir()}")
    return "\n".join(rows)
