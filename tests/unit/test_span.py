"""Several epochs per execution (raysl.train.span): rows split back into their epochs, batches that do not depend
on how the rows arrive or on which span an epoch was read in, and errors that reach the consumer."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np
import pytest

from raysl.train.batcher import EpochBatcher, EpochSplitter
from raysl.train.span import (
    FIRST_SPAN_EPOCHS,
    FIRST_SPAN_PREFETCH,
    MAX_SPAN_EPOCHS,
    PREFETCH_BLOCKS,
    SpanReader,
    span_epochs,
)
from raysl.train.stream import Position, WorkerStream, epoch_files

ROWS = {f"f{i}": 10 + i for i in range(8)}  # file → rows in it
FILES = sorted(ROWS)


def rows_of(files: list[str]) -> Iterator[tuple[str, int]]:
    for f in files:
        for j in range(ROWS[f]):
            yield f, j


def fake_blocks(calls: list[tuple[list[str], int | None, int]], block_rows: int = 7, fail_after: int | None = None):  # type: ignore[no-untyped-def]
    """What a Ray Data execution hands a span: ordered blocks with a `path` column, cut at `block_rows` rows
    regardless of file boundaries (as grouped read tasks do). Each call is recorded as (files, tasks, prefetch)."""
    def open_blocks(files: list[str], read_tasks: int | None, prefetch: int) -> Iterator[dict[str, Any]]:
        calls.append((list(files), read_tasks, prefetch))
        rows = list(rows_of(files))
        for i in range(0, len(rows), block_rows):
            if fail_after is not None and i >= fail_after:
                raise OSError("connection cut")
            part = rows[i:i + block_rows]
            yield {"path": np.array([f for f, _ in part], dtype=object),
                   "key": np.array([f"{f}/{j}" for f, j in part]),
                   "x": np.array([[ROWS[f], j] for f, j in part], dtype=np.int64)}
    return open_blocks


def reader(calls: list[Any], batch: int = 8, buffer: int = 16, **kw: Any) -> SpanReader:
    return SpanReader(fake_blocks(calls, **kw), batch, buffer, seed_of=lambda e: 1000 + e, collate=lambda b: b,
                      cpus=2, normalize=lambda files: list(files))


def epoch_keys(batches: Iterator[dict[str, Any]]) -> list[list[str]]:
    return [b["key"].tolist() for b in batches]


def test_batcher_output_depends_on_row_order_not_on_blocks() -> None:
    rows = {"k": np.arange(101), "v": np.arange(101) * 2.0}

    def run(cuts: list[int]) -> list[list[int]]:
        b = EpochBatcher(16, 40, np.random.default_rng(5))
        out: list[dict[str, Any]] = []
        for lo, hi in zip([0, *cuts], [*cuts, 101], strict=True):
            out += b.add({k: v[lo:hi] for k, v in rows.items()})
        out += b.finish()
        assert all(np.array_equal(o["v"], o["k"] * 2.0) for o in out)  # columns stay aligned
        return [o["k"].tolist() for o in out]

    one = run([])
    assert run([3, 50, 51, 99]) == one == run(list(range(1, 101)))
    assert len(one) == 101 // 16 and all(len(b) == 16 for b in one)  # drop_last
    flat = sum(one, [])
    assert len(set(flat)) == len(flat)  # no row twice
    assert flat != sorted(flat)  # shuffled
    assert max(flat[:16]) < 16 + 40  # a draw only sees the rows that reached the buffer


def test_batcher_keeps_long_strings_of_later_blocks() -> None:
    b = EpochBatcher(2, 0, np.random.default_rng(0))
    out = list(b.add({"key": np.array(["a"])})) + list(b.add({"key": np.array(["a-much-longer-key"])}))
    assert sorted(out[0]["key"].tolist()) == ["a", "a-much-longer-key"]


def test_splitter_walks_the_plan_and_skips_files_without_rows() -> None:
    s = EpochSplitter([(3, ["a", "b", "c"]), (4, ["c2", "a", "b"])])
    assert list(s.split(np.array(["a", "a", "c", "c2"]))) == [(3, 0, 2), (3, 2, 3), (4, 3, 4)]  # b had no rows
    assert list(s.split(np.array(["a", "b"]))) == [(4, 0, 1), (4, 1, 2)]
    with pytest.raises(RuntimeError, match="out of order"):
        list(s.split(np.array(["a"])))


def test_span_length_and_its_stop_at_a_repeated_boundary_file() -> None:
    def plan(e: int) -> list[str]:
        return [f"{e}-{i}" for i in range(8)]

    assert span_epochs(plan, 0, 8) == MAX_SPAN_EPOCHS
    assert span_epochs(plan, 0, 3) == 1  # too few files: one execution per epoch
    big = [f"x{i}" for i in range(64)]
    assert span_epochs(lambda e: big, 0, 64) == 1  # a big epoch is its own execution
    assert span_epochs(lambda e: ["a", "b", "c", "d"] if e % 2 == 0 else ["d", "c", "b", "a"], 0, 4) == 1


def test_epochs_of_a_span_are_the_epochs_read_alone() -> None:
    def plan(e: int) -> list[str]:
        return epoch_files(FILES, 7, e, 0, 1)[0]

    calls: list[Any] = []
    spanning = reader(calls)
    spanning.follow(plan)
    together = [epoch_keys(spanning(plan(e), e)) for e in range(MAX_SPAN_EPOCHS + 2)]
    assert len(calls) == 2 and calls[0][0] == sum((plan(e) for e in range(FIRST_SPAN_EPOCHS)), [])
    assert calls[0][1] == len(calls[0][0])  # the first span: a read task per file, the first rows come soon
    assert calls[1][0] == sum((plan(e) for e in range(FIRST_SPAN_EPOCHS, FIRST_SPAN_EPOCHS + MAX_SPAN_EPOCHS)), [])
    assert calls[1][1] == 4  # then the files are known to be small (~14 rows): grouped, 2 tasks per CPU at least
    # the run waits for the first span's first batch: no blocks held back; later spans fetch ahead
    assert (calls[0][2], calls[1][2]) == (FIRST_SPAN_PREFETCH, PREFETCH_BLOCKS) == (0, 2)
    for e in range(MAX_SPAN_EPOCHS + 2):
        alone = epoch_keys(reader([], block_rows=5)(plan(e), e))  # no plan: one epoch, other blocks
        assert together[e] == alone
        keys = sum(together[e], [])
        assert len(keys) == len(set(keys)) == (sum(ROWS.values()) // 8) * 8  # every batch full, none repeated
        assert {k.split("/")[0] for k in keys} <= set(FILES)
    assert together[0] != together[1]  # each epoch its own order and shuffle


def test_files_of_big_rows_keep_a_read_task_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read tasks are grouped by rows for small rows, but a task stays a file where the rows' output is big (224 px
    views): TASK_BYTES bounds a grouped task as TASK_ROWS does."""
    import raysl.train.span as span

    def plan(e: int) -> list[str]:
        return epoch_files(FILES, 7, e, 0, 1)[0]

    calls: list[Any] = []
    monkeypatch.setattr(span, "TASK_BYTES", 100)  # ~3 rows of this test's blocks
    big = reader(calls)
    big.follow(plan)
    for e in range(FIRST_SPAN_EPOCHS + 1):
        epoch_keys(big(plan(e), e))
    assert len(calls) == 2 and calls[1][1] == len(calls[1][0])
    assert big.bytes_per_row is not None and big.bytes_per_row > 8


def plan7(e: int) -> list[str]:
    return epoch_files(FILES, 7, e, 0, 1)[0]


def held_reader(gate: threading.Event, count_rows: Callable[[str], int | None] | None) -> SpanReader:
    """A reader whose execution yields a block per file, holds the first file of the second epoch back until `gate`
    is set, and hands over an epoch's last file only once it is counted (where counting is on)."""
    def open_blocks(files: list[str], read_tasks: int | None, prefetch: int) -> Iterator[dict[str, Any]]:
        for i, f in enumerate(files):
            if i == len(FILES):
                gate.wait(10)
            if count_rows is not None and i == len(FILES) - 1:
                until = time.monotonic() + 5
                while f not in r.counts and time.monotonic() < until:
                    time.sleep(0.01)
            yield {"path": np.array([f] * ROWS[f], dtype=object), "key": np.array([f"{f}/{j}" for j in range(ROWS[f])])}

    r = SpanReader(open_blocks, 8, 16, seed_of=lambda e: 1000 + e, collate=lambda b: b, cpus=2,
                   normalize=lambda files: list(files), count_rows=count_rows)
    r.follow(plan7)
    return r


def test_an_epoch_ends_as_its_last_files_counted_rows_arrive() -> None:
    """With the last file's rows counted, an epoch's last batches do not wait for a row of the next epoch (a read
    task later); without a count they do. The batches are the same either way."""
    alone = [epoch_keys(reader([])(plan7(e), e)) for e in (0, 1)]  # one execution per epoch
    with ThreadPoolExecutor(2) as pool:
        gate = threading.Event()
        counted = held_reader(gate, ROWS.get)
        assert pool.submit(lambda: epoch_keys(counted(plan7(0), 0))).result(timeout=10) == alone[0]
        gate.set()
        assert epoch_keys(counted(plan7(1), 1)) == alone[1]

        gate = threading.Event()
        uncounted = held_reader(gate, None)
        first = pool.submit(lambda: epoch_keys(uncounted(plan7(0), 0)))
        with pytest.raises(FutureTimeout):
            first.result(timeout=0.5)  # held: the epoch's end is seen only in the next epoch's rows
        gate.set()
        assert first.result(timeout=10) == alone[0]


def test_a_count_that_fails_or_falls_short_is_not_trusted_silently() -> None:
    def fails(f: str) -> int:
        raise OSError("footer unreadable")

    calls: list[Any] = []
    r = SpanReader(fake_blocks(calls, block_rows=1), 8, 16, seed_of=lambda e: 1000 + e, collate=lambda b: b, cpus=2,
                   normalize=lambda files: list(files), count_rows=fails)
    r.follow(plan7)
    assert [epoch_keys(r(plan7(e), e)) for e in (0, 1)] == [epoch_keys(reader([])(plan7(e), e)) for e in (0, 1)]

    short = SpanReader(fake_blocks([], block_rows=1), 8, 16, seed_of=lambda e: 1000 + e, collate=lambda b: b,
                       cpus=2, normalize=lambda files: list(files), count_rows=lambda f: ROWS[f] - 1)
    short.follow(plan7)
    with pytest.raises(RuntimeError, match="more rows than the .* counted"):
        for e in (0, 1):
            list(short(plan7(e), e))


def test_worker_stream_resumes_inside_a_span_exactly() -> None:
    def stream(start: Any = None) -> WorkerStream:
        return WorkerStream(reader([]), FILES, seed=3, rank=0, world=1, start=start)

    whole = [next(s)["key"].tolist() for s in [stream()] for _ in range(60)]
    first = stream()
    seen = [next(first)["key"].tolist() for _ in range(37)]  # 13 batches an epoch: inside the third
    assert first.position == Position(2, 11)
    again = stream(start=first.position)
    assert seen + [next(again)["key"].tolist() for _ in range(23)] == whole


def test_a_span_reads_no_more_epochs_than_the_run_has_batches_for() -> None:
    calls: list[Any] = []
    stream = WorkerStream(reader(calls), FILES, seed=3, rank=0, world=1, budget=40)  # 13 batches an epoch
    for _ in range(40):
        next(stream)
    # the first span: FIRST_SPAN_EPOCHS epochs (26 batches); 14 left need 2 more epochs, not MAX_SPAN_EPOCHS
    assert [len(files) // len(FILES) for files, *_ in calls] == [FIRST_SPAN_EPOCHS, 2]


def test_a_read_error_reaches_the_consumer() -> None:
    r = reader([], fail_after=20)
    with pytest.raises(OSError, match="connection cut"):
        list(r(FILES, 0))


def test_a_new_plan_or_an_out_of_turn_epoch_starts_a_new_span() -> None:
    calls: list[Any] = []
    r = reader(calls)
    r.follow(lambda e: FILES)
    list(r(FILES, 0))
    list(r(FILES, 1))
    assert len(calls) == 1  # epoch 1 came from the first span
    list(r(FILES, 5))  # not the span's next epoch
    assert len(calls) == 2
    list(r(FILES[::-1], 6))  # other files than planned
    assert len(calls) == 3
    r.close()


def test_view_transform_copies_sent_to_tasks_draw_their_own_views() -> None:
    """One transform is pickled into every Ray task of an execution (and a span's execution covers several epochs):
    each unpickled copy must draw its own crops, not replay the pickled generator's."""
    import io
    import pickle

    from PIL import Image

    from raysl.config import parse_config
    from raysl.methods.byol import BYOL

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    batch = {"image": np.array([buf.getvalue()] * 4, dtype=object), "key": np.array(["a", "b", "c", "d"])}
    view = BYOL.view_transform(parse_config({"data": {"uri": "/x"}, "model": {"image_size": 32}}))
    blob = pickle.dumps(view)
    one, two = pickle.loads(blob)(dict(batch)), pickle.loads(blob)(dict(batch))
    assert one["view1"].shape == two["view1"].shape == (4, 3, 32, 32)
    assert not np.array_equal(one["view1"], two["view1"])
