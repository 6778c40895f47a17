"""Each worker's stream: a seeded file partition per epoch, and a position that resumes exactly."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from raysl.train.stream import Position, WorkerStream, epoch_files, restore_position

FILES = [f"f{i:02d}" for i in range(10)]


def reader(per_batch: int = 2) -> Any:
    """A stand-in for a worker's Ray Data epoch: batches of file names in the order given."""
    def open_epoch(files: list[str], epoch: int) -> Iterator[dict[str, Any]]:
        for i in range(0, len(files) - per_batch + 1, per_batch):  # drop_last, as the real reader
            yield {"key": files[i : i + per_batch], "epoch": epoch}
    return open_epoch


def take(stream: WorkerStream, n: int) -> list[tuple[int, tuple[str, ...]]]:
    return [(b["epoch"], tuple(b["key"])) for b in (next(stream) for _ in range(n))]


def test_partitions_cover_every_file_once_and_change_per_epoch() -> None:
    parts = [epoch_files(FILES, seed=3, epoch=0, rank=r, world=3)[0] for r in range(3)]
    assert sorted(sum(parts, [])) == FILES
    assert epoch_files(FILES, 3, 0, 0, 3) == epoch_files(FILES, 3, 0, 0, 3)  # seeded
    assert epoch_files(FILES, 3, 1, 0, 3)[0] != parts[0]  # a new order each epoch
    assert epoch_files(FILES[:1], 3, 0, 1, 2) == (FILES[:1], 2)  # fewer files than workers: stride


def test_no_epoch_opens_with_the_file_the_previous_epoch_closed_with() -> None:
    files = FILES[:4]  # four files: a quarter of unconstrained epochs would repeat the boundary file
    for seed in range(20):
        for rank, world in ((0, 1), (1, 2)):
            parts = [epoch_files(files, seed, e, rank, world)[0] for e in range(30)]
            others = [epoch_files(files, seed, e, 1 - rank, world)[0] for e in range(30)] if world == 2 else []
            for e, p in enumerate(parts):  # still every file once per epoch, over the ranks
                assert sorted(p + (others[e] if others else [])) == files
            if len(parts[0]) > 2:
                assert all(b[0] != a[-1] for a, b in zip(parts, parts[1:], strict=False))


@pytest.mark.parametrize("stop_after", [1, 2, 3, 5, 7])
def test_resume_from_a_saved_position_replays_exactly(stop_after: int) -> None:
    whole = take(WorkerStream(reader(), FILES, seed=1, rank=1, world=2), 10)
    first = WorkerStream(reader(), FILES, seed=1, rank=1, world=2)
    seen = take(first, stop_after)
    saved = [[0, 0], first.position.as_list()]  # as a checkpoint holds it: one entry per rank
    again = WorkerStream(reader(), FILES, seed=1, rank=1, world=2, start=restore_position(saved, 1, 2))
    assert seen + take(again, 10 - stop_after) == whole
    epoch0 = [k for e, b in whole if e == 0 for k in b]
    assert len(epoch0) == len(set(epoch0))  # no file twice in an epoch


def test_position_counts_batches_and_rolls_over_epochs() -> None:
    s = WorkerStream(reader(), FILES, seed=0, rank=0, world=1)
    take(s, 5)
    assert s.position == Position(0, 5)
    take(s, 1)
    assert s.position == Position(1, 1)


def test_stride_when_files_are_fewer_than_workers() -> None:
    files = ["only"]

    def rows(_: list[str], epoch: int) -> Iterator[dict[str, Any]]:
        yield from ({"key": [f"b{i}"], "epoch": epoch} for i in range(6))

    r0 = take(WorkerStream(rows, files, seed=0, rank=0, world=2), 3)
    r1 = take(WorkerStream(rows, files, seed=0, rank=1, world=2), 3)
    assert [b for _, b in r0] == [("b0",), ("b2",), ("b4",)] and [b for _, b in r1] == [("b1",), ("b3",), ("b5",)]


def test_other_world_size_restarts_the_epoch_and_empty_data_fails() -> None:
    assert restore_position([[2, 7], [2, 5]], 0, 4) == Position(2, 0)
    assert restore_position([], 0, 2) == Position()
    with pytest.raises(RuntimeError, match="smaller than train.batch_size"):
        next(WorkerStream(reader(per_batch=20), FILES, seed=0, rank=0, world=1))


def test_slices_apply_a_transform_to_a_whole_block_in_pieces() -> None:
    import numpy as np

    from raysl.train.slices import Slices

    sizes: list[int] = []

    def double(batch: dict[str, Any]) -> dict[str, Any]:
        sizes.append(len(batch["x"]))
        return {"y": batch["x"] * 2, "key": batch["key"]}

    block = {"x": np.arange(10), "key": np.array([f"k{i}" for i in range(10)])}
    parts = list(Slices(double, 4, 4)(block))
    assert sizes == [4, 4, 2]
    assert np.concatenate([p["y"] for p in parts]).tolist() == [2 * i for i in range(10)]
    assert np.concatenate([p["key"] for p in parts]).tolist() == block["key"].tolist()
    assert list(Slices(double, 4)({})) == []


def test_slices_grow_to_the_output_size_they_aim_at_and_keep_paths_aligned() -> None:
    """After the first slice, a slice holds as many rows as make `slice_bytes` of output, within [first, max];
    each slice's `path` rows are those of the rows it transformed."""
    import numpy as np

    from raysl.train.slices import Slices

    sizes: list[int] = []

    def kilobyte(batch: dict[str, Any]) -> dict[str, Any]:
        sizes.append(len(batch["x"]))
        return {"y": np.zeros((len(batch["x"]), 1000), np.uint8), "x": batch["x"]}

    block = {"x": np.arange(100), "path": np.array([f"f{i // 30}" for i in range(100)])}
    parts = list(Slices(kilobyte, first_rows=5, max_rows=40, slice_bytes=20_000)(dict(block)))
    assert sizes[0] == 5 and set(sizes[1:-1]) == {19} and sum(sizes) == 100  # 20,000 B / 1,008 B a row
    for p in parts:
        assert [f"f{x // 30}" for x in p["x"]] == p["path"].tolist()
    sizes.clear()
    list(Slices(kilobyte, first_rows=5, max_rows=40, slice_bytes=10**9)(dict(block)))
    assert sizes == [5, 40, 40, 15]
    sizes.clear()
    list(Slices(kilobyte, first_rows=5, max_rows=40, slice_bytes=1)(dict(block)))
    assert set(sizes) == {5}  # never below the first slice's rows


def test_slices_refuse_a_transform_that_drops_rows_of_a_span() -> None:
    import numpy as np

    from raysl.train.slices import Slices

    block = {"x": np.arange(10), "path": np.array(["a"] * 10)}
    with pytest.raises(ValueError, match="epoch_spans = False"):
        list(Slices(lambda b: {"x": b["x"][:-1]}, 4)(block))


def test_data_defaults_hand_a_finished_tasks_cpu_on_at_once() -> None:
    """The settings raysl.train.stream.prompt_handover changes exist in this Ray and take effect: the executor's
    metadata is fetched inline (the CPU is released in the same loop pass) and the loop waits at most 30 ms."""
    import ray.data._internal.execution.metadata_fetcher as fetcher
    import ray.data._internal.execution.streaming_executor_state as state

    from raysl.train.stream import LOOP_WAIT_S, data_defaults

    data_defaults()
    assert isinstance(fetcher.make_metadata_fetcher(), fetcher.InlineMetadataFetcher)
    assert state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S == LOOP_WAIT_S


def test_limits_are_reread_fast_until_answered_then_at_rays_interval() -> None:
    """raysl.train.stream.prompt_limits on Ray's own ResourceManager.get_global_limits, fed by a stand-in for the
    coordinator: re-read every 50 ms while the answer has no CPUs, then at Ray's 1 s for that execution only."""
    import time

    from ray.data import ExecutionOptions, ExecutionResources
    from ray.data._internal.execution.resource_manager import ResourceManager

    from raysl.train.stream import LIMITS_REFRESH_S, prompt_limits

    prompt_limits()
    answers = iter([ExecutionResources(cpu=0), ExecutionResources(cpu=0), ExecutionResources(cpu=2)])
    manager = object.__new__(ResourceManager)  # only what get_global_limits reads
    manager._options = ExecutionOptions()
    manager._get_total_resources = lambda: next(answers)
    manager._object_store_memory_limit_fraction = 0.5
    manager._global_limits, manager._global_limits_last_update_time = ExecutionResources.zero(), 0

    assert ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S == LIMITS_REFRESH_S
    assert manager.get_global_limits().cpu == 0  # not answered yet: asked again 50 ms later
    time.sleep(2 * LIMITS_REFRESH_S)
    assert manager.get_global_limits().cpu == 0
    time.sleep(2 * LIMITS_REFRESH_S)
    assert manager.get_global_limits().cpu == 2
    assert manager.GLOBAL_LIMITS_UPDATE_INTERVAL_S == 1  # answered: Ray's interval from here on
    assert ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S == LIMITS_REFRESH_S  # the next execution starts fast
    time.sleep(2 * LIMITS_REFRESH_S)
    assert manager.get_global_limits().cpu == 2  # the cached answer: the stand-in is not asked a fourth time
