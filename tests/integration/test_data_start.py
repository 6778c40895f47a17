"""A Ray Data execution uses its CPUs from its first second (raysl.train.stream.prompt_limits).

Ray 2.60 re-reads the resources an execution may use at most once a second and starts from zero, so a short
execution (a training worker's epoch) ran its tasks one at a time; each epoch paid for that second.

The very first execution on a cluster also waits ~2 s for Ray Data's autoscaling coordinator actor to be created
(once per cluster, not per execution or per process); the test pays that first, in the driver, then measures a
fresh process's first execution, as a training worker's first epoch is."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _stamp(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    t0 = time.time()
    time.sleep(0.3)
    return {"start": np.array([t0]), "end": np.array([time.time()])}


def _spans() -> list[tuple[float, float]]:
    """Four 0.3 s tasks on a 2-CPU budget, in this process, with raysl's Ray Data settings: (start, end) of each."""
    import ray.data

    from raysl.train.stream import data_defaults

    data_defaults()
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.resource_limits
    ctx.execution_options.resource_limits = ray.data.ExecutionResources(cpu=2)
    try:
        ds = ray.data.range(4, override_num_blocks=4).map_batches(_stamp, batch_size=None)
        return [(float(b["start"][i]), float(b["end"][i])) for b in ds.iter_batches(batch_format="numpy")
                for i in range(len(b["start"]))]
    finally:
        ctx.execution_options.resource_limits = saved


def test_a_short_execution_runs_tasks_side_by_side_from_the_start(ray_cluster: None) -> None:
    import ray

    # two CPUs free on the shared cluster (an earlier test's training workers may still be stopping): the
    # coordinator grants an execution no more than is free, and the test is about when, not how much
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    _spans()  # the cluster's coordinator actor exists from here on
    # A fresh process, as a training worker is; num_cpus=0 so the actor leaves the cluster's CPUs to the tasks
    worker: Any = ray.remote(num_cpus=0)(_Worker).remote()  # type: ignore[attr-defined]  # Ray's stubs
    try:
        rows = ray.get(worker.spans.remote(), timeout=60)
    finally:
        ray.kill(worker)
    assert len(rows) == 4
    overlapping = max(sum(1 for s, e in rows if s <= t < e) for t, _ in rows)
    # Two at a time from the first task (one at a time without the fix: 1.2 s end to end)
    assert overlapping == 2, rows


class _Worker:
    def spans(self) -> list[tuple[float, float]]:
        return _spans()
