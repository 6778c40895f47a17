"""Several epochs of a worker's stream read by one Ray Data execution ("a span").

Each Ray Data execution has a fixed cost (planning, its coordinator and stats actors, the first tasks' start, the
last tasks' tail on idle CPUs): 0.25–0.4 CPU-seconds on 2 cores, a third of an epoch of 1,000 CIFAR images (issue
12 note). A worker whose epochs are small (many workers, or a small corpus) paid it every epoch. A span reads the
files of epochs e, e+1, … e+K-1 (each epoch's own seeded order, `WorkerStream`'s plan) as one ordered read. Small
files are grouped into read tasks of about TASK_ROWS rows or TASK_BYTES of output, whichever is fewer rows; rows
per file and output bytes per row are learned from the worker's previous span, so the first span reads a task per
file and its first batches come as soon as one file is read. Ray Data reads ahead within a span, so the first span
is FIRST_SPAN_EPOCHS long and a later one reads no more epochs than the batches the run has left need
(`WorkerStream`'s budget): epochs a run never takes would be decoded for nothing.
Every row carries its source file's path, so the rows are split back into epochs by walking the planned file
sequence, and raysl batches each epoch itself: a local shuffle seeded by (seed, epoch, rank) whose output depends
only on the epoch's row order, so an epoch read inside a span and the same epoch read alone after a restart give the
same batches, and the last partial batch of each epoch is dropped. An epoch's last batches go out as soon as its last
file's rows are all in, where a thread has counted that file's rows (raysl.data.file_rows) by then; otherwise when a
row of the next epoch arrives, a read task later. A span stops before an epoch that opens with the file the previous
one closed with (the two reads could not be told apart; `epoch_files` orders epochs so that this does not happen).
Methods whose source is not a plain file list (video clips, detection) keep one execution per epoch.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from raysl.methods.base import FILES_WITHOUT_SPLIT
from raysl.train.batcher import Batch, EpochBatcher, EpochSplitter

log = logging.getLogger(__name__)

SPAN_FILES = 64  # a span covers at least this many files when the epochs are small (capped by MAX_SPAN_EPOCHS)
MAX_SPAN_EPOCHS = 8
FIRST_SPAN_EPOCHS = 2  # until rows per file are known, a span is short: a run that ends early reads little ahead
# fewer files per epoch: one execution per epoch, each file split across the CPUs (open_source's own threshold)
MIN_FILES = FILES_WITHOUT_SPLIT
# A read task's size once the files are known to be smaller (learned from the previous span). Each task costs the
# execution's scheduling loop work and a hand-over gap on its CPU: over 10,000 CIFAR images on 2 CPUs, tasks of
# 2,500 and 5,000 rows read 3-10% more img/s than one 1,250-row file each, in every paired round (issue 12 note).
# The bytes bound keeps a task a file where the views are big (~300 KB an image at 224 px).
TASK_ROWS = 4000
TASK_BYTES = 32 << 20
# Blocks the Ray Data iterator fetches ahead. Its window hands a block over only once the blocks after it are
# ready, which costs two read tasks of latency: for 224-px images in files of ~250 rows on 2 CPUs, a run's first
# batch came 22.9 s after the read began with 2 and 15.1 s with 0 (issue 12 note). Later, throughput counts and
# the window is kept: without it, 10,000 CIFAR images read 2-6% slower in each of 3 paired rounds.
FIRST_SPAN_PREFETCH = 0
PREFETCH_BLOCKS = 2
Plan = Callable[[int], list[str]]


def span_epochs(plan: Plan, start: int, n_files: int) -> int:
    """How many epochs from `start` one execution reads: enough to cover SPAN_FILES files, at most
    MAX_SPAN_EPOCHS, and never across an epoch that opens with the file its predecessor closed with."""
    if n_files < MIN_FILES:
        return 1
    want = min(MAX_SPAN_EPOCHS, math.ceil(SPAN_FILES / n_files))
    k, last = 1, plan(start)[-1]
    while k < want:
        nxt = plan(start + k)
        if not nxt or nxt[0] == last:
            break
        k, last = k + 1, nxt[-1]
    return k


_END = object()


class Span:
    """One execution over `epochs` [(epoch, files)], batched per epoch on a thread, a few batches ahead."""

    def __init__(self, blocks: Iterator[Batch], epochs: list[tuple[int, list[str]]],
                 batcher: Callable[[int], EpochBatcher], collate: Callable[[Batch], Batch], ahead: int = 2,
                 counts: dict[str, int] | None = None) -> None:
        self.epochs = epochs
        self.next_epoch = epochs[0][0]
        self._q: queue.Queue[tuple[int, Any]] = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self.splitter = EpochSplitter(epochs, counts)
        self._collate = collate
        self._thread = threading.Thread(target=self._run, args=(blocks, batcher), daemon=True,
                                        name="raysl-span")
        self._thread.start()

    def rows_per_file(self) -> float | None:
        """Rows per file over the files read so far (None before the first row)."""
        s = self.splitter
        return s.rows / (s.at + 1) if s.rows else None

    def bytes_per_row(self) -> float | None:
        s = self.splitter
        return s.bytes / s.rows if s.rows else None

    def files(self, epoch: int) -> list[str] | None:
        return next((f for e, f in self.epochs if e == epoch), None)

    def _put(self, item: tuple[int, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, blocks: Iterator[Batch], batcher: Callable[[int], EpochBatcher]) -> None:
        splitter = self.splitter
        current, b = self.epochs[0][0], batcher(self.epochs[0][0])
        try:
            for block in blocks:
                paths = np.asarray(block.pop("path"))
                splitter.bytes += sum(np.asarray(v).nbytes for v in block.values())
                for epoch, lo, hi in splitter.split(paths):
                    if epoch < current:  # its epoch ended on the file's count, and more rows came
                        raise RuntimeError(splitter.overrun(str(paths[lo])))
                    while current < epoch:  # the rows moved on: the earlier epoch is complete
                        if not self._end(current, b):
                            return
                        current += 1
                        b = batcher(current)
                    for out in b.add({k: v[lo:hi] for k, v in block.items()}):
                        if not self._put((epoch, self._collate(out))):
                            return
                    if splitter.epoch_complete():  # its last file's rows are all in: no need to wait for more
                        if not self._end(current, b):
                            return
                        current += 1
                        b = batcher(current)
            for epoch, _ in self.epochs:  # the read is over: the epochs from `current` on end here
                if epoch < current:
                    continue
                if epoch > current:
                    b = batcher(epoch)
                if not self._end(epoch, b):
                    return
        except BaseException as exc:  # handed to the consumer, who raises it in the training loop
            self._put((current, exc))
        finally:
            close = getattr(blocks, "close", None)  # ends the Ray Data execution now, not when collected
            if close is not None:
                close()

    def _end(self, epoch: int, b: EpochBatcher) -> bool:
        """Hand out `epoch`'s last batches and its end; False once the span is closed."""
        for out in b.finish():
            if not self._put((epoch, self._collate(out))):
                return False
        return self._put((epoch, _END))

    def read(self, epoch: int) -> Iterator[Batch]:
        """The batches of `epoch` (this span's next one; batches of an earlier, abandoned epoch are skipped)."""
        self.next_epoch = epoch + 1
        return self._batches(epoch)

    def _batches(self, epoch: int) -> Iterator[Batch]:
        while True:
            e, item = self._q.get()
            if isinstance(item, BaseException):
                raise item
            if e < epoch:
                continue
            if item is _END:
                return
            yield item

    def close(self) -> None:
        self._stop.set()


class SpanReader:
    """`(files, epoch) → batches of that epoch`, reading several epochs per execution where `follow` gave it the
    plan of the epochs to come (`WorkerStream` does); without a plan, one execution per epoch.

    `open_blocks(files, read_tasks, prefetch)`: the ordered Ray Data blocks of those files (with a `path` column),
    read by `read_tasks` tasks (None: the reader's own split), `prefetch` blocks fetched ahead; `seed_of(epoch)`:
    the epoch's shuffle seed; `count_rows(path)`: the rows a file will yield (None: unknown), asked on a thread for
    the last file of each epoch a span reads, so the epoch can end as its last rows arrive."""

    def __init__(self, open_blocks: Callable[[list[str], int | None, int], Iterator[Batch]], batch_size: int,
                 buffer_rows: int, seed_of: Callable[[int], int], collate: Callable[[Batch], Batch], cpus: int,
                 normalize: Callable[[list[str]], list[str]],
                 count_rows: Callable[[str], int | None] | None = None) -> None:
        self.open_blocks, self.batch_size, self.buffer_rows = open_blocks, batch_size, buffer_rows
        self.seed_of, self.collate, self.normalize = seed_of, collate, normalize
        self.count_rows = count_rows
        self.counts: dict[str, int] = {}  # rows per file, as counted so far in this run
        self.min_tasks = 2 * max(1, cpus)
        self.rows_per_file: float | None = None  # learned from the previous span
        self.bytes_per_row: float | None = None
        self.plan: Plan | None = None
        self.batches_left: Callable[[], int | None] = lambda: None
        self._span: Span | None = None

    def follow(self, plan: Plan, batches_left: Callable[[], int | None] | None = None) -> None:
        """The files this worker reads in each epoch (`WorkerStream`'s partition), so a span can read ahead, and
        how many more batches the run will take (None: no end), so a span does not read epochs it will not use."""
        self.plan = plan
        if batches_left is not None:
            self.batches_left = batches_left

    def _rows_per_file(self) -> float | None:
        known = self._span.rows_per_file() if self._span is not None else None
        return known or self.rows_per_file

    def span_length(self, files: list[str], epoch: int) -> int:
        """Epochs the span opened at `epoch` reads: `span_epochs`, at most FIRST_SPAN_EPOCHS until rows per file are
        known, then no more than the batches left need."""
        plan = self.plan
        if plan is None:
            return 1
        k = span_epochs(lambda e: files if e == epoch else plan(e), epoch, len(files))
        rows, left = self._rows_per_file(), self.batches_left()
        if rows is None:
            return min(k, FIRST_SPAN_EPOCHS)
        if left is not None:
            per_epoch = max(1, int(rows * len(files)) // self.batch_size)
            k = min(k, max(1, math.ceil(left / per_epoch)))
        return k

    def __call__(self, files: list[str], epoch: int) -> Iterator[Batch]:
        span = self._span
        if span is None or span.next_epoch != epoch or span.files(epoch) != self.normalize(files):
            if span is not None:
                self.rows_per_file = self._rows_per_file()
                self.bytes_per_row = span.bytes_per_row() or self.bytes_per_row
                span.close()
            span = self._span = self._start(files, epoch)
        return span.read(epoch)

    def _start(self, files: list[str], epoch: int) -> Span:
        plan = self.plan
        k = self.span_length(files, epoch)
        epochs = [(epoch, self.normalize(files))]
        epochs += [(e, self.normalize(plan(e))) for e in range(epoch + 1, epoch + k)] if plan is not None else []
        every = [f for _, fs in epochs for f in fs]
        tasks: int | None = len(every)  # a task per file, unless the files are known to be small
        if len(files) < MIN_FILES:
            tasks = None  # few files: the reader splits them across the CPUs itself
        elif k > 1 and self.rows_per_file is not None:
            per_task = min(TASK_ROWS, TASK_BYTES / max(1.0, self.bytes_per_row or 0.0))
            tasks = max(min(self.min_tasks, len(every)), math.ceil(self.rows_per_file * len(every) / per_task))
            tasks = min(tasks, len(every))
        # the first span: the run waits for its first batch (see FIRST_SPAN_PREFETCH)
        prefetch = FIRST_SPAN_PREFETCH if self.rows_per_file is None else PREFETCH_BLOCKS
        log.debug("span: epochs %d-%d, %d files, %s read tasks, prefetch %d", epoch, epoch + k - 1, len(every), tasks,
                  prefetch)

        def batcher(e: int) -> EpochBatcher:
            return EpochBatcher(self.batch_size, self.buffer_rows, np.random.default_rng(self.seed_of(e)))

        self._count([fs[-1] for _, fs in epochs if fs])
        return Span(self.open_blocks(every, tasks, prefetch), epochs, batcher, self.collate, counts=self.counts)

    def _count(self, files: list[str]) -> None:
        """Count the rows of `files` not counted yet, on a thread: the span runs meanwhile, and an epoch whose last
        file is not counted when its rows arrive ends the way it would without a count."""
        count, todo = self.count_rows, [f for f in dict.fromkeys(files) if f not in self.counts]
        if count is None or not todo:
            return

        def run() -> None:
            for f in todo:
                try:
                    n = count(f)
                except Exception as exc:  # a count is an optimisation: never a reason to stop reading
                    log.debug("rows of %s not counted: %s", f, type(exc).__name__)
                    continue
                if n is not None:
                    self.counts[f] = n

        threading.Thread(target=run, daemon=True, name="raysl-count-rows").start()

    def close(self) -> None:
        if self._span is not None:
            self._span.close()
            self._span = None
