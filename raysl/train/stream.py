"""Each training worker's data stream, with a position a checkpoint records and a restart resumes exactly.

Ray Data's split hands blocks to whichever worker has the fewest rows and reseeds its file shuffle per
execution, so after a restart a stream cannot be put back where it was (ray-project/ray#37633, #48224).
raysl partitions by file instead, as MosaicML's streaming does for deterministic mid-epoch resumption: in
epoch `e` the file list is permuted with a seed derived from (train.seed, e), worker `r` of `n` reads files
`r::n` of that order as its own Ray Data stream (order preserved, local shuffle seeded by (seed, e, r)), and
its position is (epoch, batches taken this epoch). A restarted worker rebuilds the same epoch stream and
steps over the batches it had already taken (they are read again, not trained on): no image is seen twice
in an epoch and none is skipped.

A corpus with fewer files than workers (one Parquet file, say) is read whole by every worker, which keeps
every `n`-th batch; sources that are not plain file lists (a COCO detection set, a held labeled subset) use
Ray Train's own split and resume at the start of the stream's current pass.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from raysl.config import PretrainConfig
from raysl.console import is_verbose
from raysl.methods import get_method
from raysl.train.slices import Slices

log = logging.getLogger(__name__)
TRACE_ENV = "RAYSL_TRACE_KEYS"  # a folder: each worker appends "step epoch key" lines (resumption tests)


@dataclass
class Position:
    epoch: int = 0
    batches: int = 0  # batches taken (trained on or stepped over) in `epoch`

    def as_list(self) -> list[int]:
        return [self.epoch, self.batches]


def epoch_files(files: list[str], seed: int, epoch: int, rank: int, world: int) -> tuple[list[str], int]:
    """(files this worker reads in `epoch`, batch stride): a seeded permutation of the whole list, files
    `rank::world` of it; with fewer files than workers every worker reads all and keeps every world-th batch.
    An epoch never opens with the file the worker's previous epoch closed with (its first two files swap): several
    epochs are read as one stream (raysl.train.span), and two reads of one file back to back could not be told
    apart. The swap never moves an epoch's last file, so each epoch's order depends on its own and the previous
    epoch's permutation only."""
    part, stride = _part(files, seed, epoch, rank, world)
    if epoch > 0 and len(part) > 2 and part[0] == _part(files, seed, epoch - 1, rank, world)[0][-1]:
        part[0], part[1] = part[1], part[0]
    return part, stride


def _part(files: list[str], seed: int, epoch: int, rank: int, world: int) -> tuple[list[str], int]:
    order = np.random.default_rng([seed, epoch]).permutation(len(files))
    ordered = [files[i] for i in order]
    if len(files) >= world:
        return ordered[rank::world], 1
    return ordered, world


class WorkerStream:
    """Batches for one worker, epoch after epoch, from `open_epoch(files, epoch) -> iterator of batches`."""

    def __init__(self, open_epoch: Callable[[list[str], int], Iterator[dict[str, Any]]], files: list[str], *,
                 seed: int, rank: int, world: int, start: Position | None = None, budget: int | None = None) -> None:
        self.open_epoch, self.files = open_epoch, files
        self.seed, self.rank, self.world = seed, rank, world
        self.position = start or Position()
        self._skip = self.position.batches  # batches of the resumed epoch to step over
        self._it: Iterator[dict[str, Any]] | None = None
        self._index = 0  # batches drawn from the current epoch's iterator (before striding)
        self._stride = 1
        self._left = budget  # batches this stream will still hand out (None: no end)
        follow = getattr(open_epoch, "follow", None)  # a SpanReader reads the epochs to come in one execution
        if follow is not None:
            follow(lambda epoch: epoch_files(files, seed, epoch, rank, world)[0], self._raw_left)

    def _raw_left(self) -> int | None:
        """Batches still to draw from the epoch readers: those left to hand out, each `stride` draws, and the
        resumed epoch's batches to step over."""
        return None if self._left is None else (self._left * self._stride + self._skip)

    def _open(self) -> None:
        part, self._stride = epoch_files(self.files, self.seed, self.position.epoch, self.rank, self.world)
        self._it, self._index = self.open_epoch(part, self.position.epoch), 0
        if self._skip:
            log.info("rank %d: resuming epoch %d after %d batches", self.rank, self.position.epoch, self._skip)

    def _draw(self) -> dict[str, Any] | None:
        assert self._it is not None
        while True:
            b = next(self._it, None)
            if b is None:
                return None
            i, self._index = self._index, self._index + 1
            if self._stride == 1 or i % self._stride == self.rank:
                return b

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def close(self) -> None:
        """Stop reading ahead (a SpanReader's thread and execution)."""
        close = getattr(self.open_epoch, "close", None)
        if close is not None:
            close()

    def __next__(self) -> dict[str, Any]:
        empty_epochs = 0
        while True:
            if self._it is None:
                self._open()
            b = self._draw()
            if b is None:  # the epoch is over: the next one has a new order
                if self._index == 0 and not self._skip:
                    empty_epochs += 1
                    if empty_epochs > 1:
                        raise RuntimeError("this worker's data yields no full batch: the corpus is smaller than "
                                           "train.batch_size")
                self.position = Position(self.position.epoch + 1, 0)
                self._it, self._skip = None, 0
                continue
            if self._skip:
                self._skip -= 1
                continue
            self.position.batches += 1
            if self._left is not None:
                self._left -= 1
            return b


def restore_position(saved: Any, rank: int, world: int) -> Position:
    """This rank's position from a checkpoint's `data_position` (one [epoch, batches] per rank). Saved by a
    different number of workers: the partition differs, so the epoch restarts (said in the log)."""
    if not saved:
        return Position()
    if len(saved) != world:
        epoch = min(int(p[0]) for p in saved)
        log.warning("checkpoint was taken by %d workers, this run has %d: epoch %d restarts from its first batch",
                    len(saved), world, epoch)
        return Position(epoch, 0)
    epoch, batches = saved[rank]
    return Position(int(epoch), int(batches))


_TRACING: set[str] = set()  # trace files this process has written to


def trace(step: int, epoch: int, keys: Any, rank: int) -> None:
    """With $RAYSL_TRACE_KEYS set, record which samples this step trained on (tests of exact resumption): a line
    `attempt <pid>` when a process starts writing a rank's file, then `step epoch key` per sample."""
    folder = os.environ.get(TRACE_ENV)
    if not folder:
        return
    path = os.path.join(folder, f"rank{rank}.txt")
    with open(path, "a") as f:
        if path not in _TRACING:
            _TRACING.add(path)
            f.write(f"attempt {os.getpid()}\n")
        f.writelines(f"{step} {epoch} {k}\n" for k in np.asarray(keys).astype(str))


class NumpyCollate(NumpyBatchCollateFn):
    """Numeric columns → tensors; string columns (keys, labels) stay as numpy for bookkeeping.

    Ray hands out batches zero-copy from its object store, read-only; they become tensors without a copy (the
    loop's valid-row selection and the move to the device copy them anyway, and nothing writes them in place),
    so torch's warning about non-writable arrays is silenced here rather than paid for with a copy."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:  # type: ignore[override]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return {k: torch.from_numpy(np.ascontiguousarray(v)) if v.dtype.kind in "biuf" else v
                    for k, v in batch.items()}


def valid_rows(raw: dict[str, Any], valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows `valid` keeps of every tensor column but `valid`: what a method is handed (the views, or with
    `data.augment_on: gpu` the decoded images the device augments); string columns (keys, labels) stay behind."""
    return {c: v[valid] for c, v in raw.items() if c != "valid" and isinstance(v, torch.Tensor)}


def batches_from_shard(shard: Any, batch_size: int, shuffle_buffer: int, seed: int) -> Iterator[dict[str, Any]]:
    epoch = 0
    while True:
        n = 0
        for b in shard.iter_torch_batches(
            batch_size=batch_size, drop_last=True, collate_fn=NumpyCollate(), prefetch_batches=2,
            local_shuffle_buffer_size=shuffle_buffer or None, local_shuffle_seed=seed + epoch,
        ):
            n += 1
            yield b
        if n == 0:
            raise RuntimeError(f"this worker's data shard yields no full batch of {batch_size}: "
                               "the corpus is smaller than train.batch_size")
        epoch += 1


def quiet_data() -> None:
    """Ray Data's progress bars off unless --verbose: every epoch of a training stream is an execution, and its
    per-operator bars redrew thousands of lines per run. Set before datasets are made (each keeps a copy)."""
    if is_verbose():
        return
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False


LIMITS_REFRESH_S = 0.05  # how often an execution re-reads the resources it may use (Ray's default: 1 s)
LOOP_WAIT_S = 0.03  # longest an execution's scheduling loop waits on its running tasks (Ray's default: 0.1 s)


def data_defaults() -> None:
    """raysl's Ray Data settings, in each process that runs executions (the driver, each training worker); set
    before its datasets are made."""
    quiet_data()
    prompt_limits()
    prompt_handover()


def prompt_handover() -> None:
    """Start a task's successor on its CPU as soon as it ends. In Ray 2.60 the scheduling loop waits up to 0.1 s on
    its running tasks (`WAIT_FOR_TASK_COMPLETION_TIMEOUT_S`), and by default hands a finished task's output to a
    background metadata thread that releases the task's CPU only on a later pass of the loop: a CPU stood idle
    0.1–0.3 s between a worker's tasks (Ray's timeline, issue 12 note), 10–20% of an epoch of one-second tasks.
    Fetching the metadata inline (Ray's own `RAY_DATA_METADATA_PREFETCH_ON_THREAD=0` mode) and a 30 ms wait close
    most of it: this reader's epochs over 10,000 CIFAR images went from 2,027 to 2,226 img/s on 2 CPUs, and from
    1,488 to 1,719 over 1,000 (interleaved in one process, issue 12 note). Where a later Ray drops these names,
    nothing is changed."""
    try:
        import ray.data._internal.execution.metadata_fetcher as fetcher
        import ray.data._internal.execution.streaming_executor_state as state
    except ImportError:  # pragma: no cover - a Ray without these modules
        return
    if hasattr(fetcher, "_PREFETCH_ON_THREAD"):
        fetcher._PREFETCH_ON_THREAD = False
    if getattr(state, "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S", 0) > LOOP_WAIT_S:
        state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S = LOOP_WAIT_S


def prompt_limits() -> None:
    """Ray Data sizes an execution by the resources its autoscaling coordinator reserves for it, fetched without
    blocking and re-read at most once a second (`ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S`, Ray 2.60). Until
    the first answer is re-read the limits are zero, and an operator with zero budget runs one task at a time: the
    first second of every execution ran on one CPU. A training worker's epoch is an execution of a few seconds, so
    that second cost 11–30% of each epoch (measured in the issue 12 note). Re-read every 50 ms until the first
    answer with CPUs in it, then at Ray's own interval: each re-read is a call on the coordinator actor, and kept
    at 50 ms for a whole epoch they cost ~0.45 CPU-seconds per 10,000 CIFAR images (driver and coordinator, issue
    12 note), 4% of a 2-core machine. Where a later Ray drops these names, nothing is changed."""
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:  # pragma: no cover - a Ray without this module
        return
    ray_interval = getattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S", 0)
    read = getattr(ResourceManager, "get_global_limits", None)
    if ray_interval <= LIMITS_REFRESH_S or read is None:  # an older or newer Ray, or already set in this process
        return

    def get_global_limits(self: Any) -> Any:
        limits = read(self)
        if limits.cpu > 0:  # answered: back to Ray's interval, for this execution only
            self.GLOBAL_LIMITS_UPDATE_INTERVAL_S = ray_interval
        return limits

    ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = LIMITS_REFRESH_S  # type: ignore[assignment]  # Ray: int
    ResourceManager.get_global_limits = get_global_limits  # type: ignore[method-assign]


def epoch_reader(cfg: PretrainConfig, batch_size: int, rank: int, world: int
                 ) -> Callable[[list[str], int], Iterator[dict[str, Any]]]:
    """`(files, epoch) → batches`: this worker's own Ray Data stream over `files`, order preserved and the local
    shuffle seeded by (seed, epoch, rank), so the same epoch replays the same batches. Where the method allows
    (`epoch_spans`) it is a raysl.train.span.SpanReader, which reads several small epochs in one execution."""

    import ray

    from raysl.data.file_rows import count_rows
    from raysl.data.sources import given_paths
    from raysl.storage import S3Settings, resolve
    from raysl.train.span import SpanReader

    method_cls = get_method(cfg.method.name)
    s3 = S3Settings.resolve(cfg.s3.endpoint_url, cfg.s3.region)
    data_defaults()  # in this worker's process: its epoch datasets are made here
    if cfg.data.limit:  # data.limit is for the whole run: each worker reads its part of it
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"limit": -(-cfg.data.limit // world)})})
    view = method_cls.view_transform(cfg)

    def seed_of(epoch: int) -> int:
        return (cfg.train.seed * 1_000_003 + epoch) * 1009 + rank

    def transformed(ds: Any) -> Any:
        ds = ds.map_batches(Slices(view), batch_size=None, batch_format="numpy")  # whole blocks, sliced inside
        ds.context.execution_options.preserve_order = True
        return ds

    def open_epoch(files: list[str], epoch: int) -> Iterator[dict[str, Any]]:
        ds, _ = method_cls.open_source(cfg, s3, files=files)
        return iter(transformed(ds).iter_torch_batches(
            batch_size=batch_size, drop_last=True, collate_fn=NumpyCollate(), prefetch_batches=2,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None, local_shuffle_seed=seed_of(epoch)))

    if not method_cls.epoch_spans or cfg.data.limit:  # a limit counts rows of the whole read, not of each epoch
        return open_epoch

    def open_blocks(files: list[str], read_tasks: int | None, prefetch: int) -> Iterator[dict[str, Any]]:
        ds, _ = method_cls.open_source(cfg, s3, files=files, paths=True, read_tasks=read_tasks)
        return iter(transformed(ds).iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=prefetch))

    limit = ray.data.DataContext.get_current().execution_options.resource_limits.cpu
    cpus = int(limit if limit is not None and limit != float("inf") else ray.cluster_resources().get("CPU", 1))
    fs, _ = resolve(cfg.data.uri, s3)
    return SpanReader(open_blocks, batch_size, cfg.data.shuffle_buffer, seed_of, NumpyCollate(), cpus,
                      lambda files: given_paths(files, cfg.data.uri), count_rows=lambda path: count_rows(path, fs))
