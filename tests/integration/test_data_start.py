"""A Ray Data execution uses its CPUs from its first second (raysl.train.stream.prompt_limits).

Ray 2.60 re-reads the resources an execution may use at most once a second and starts from zero, so a short
execution (a training worker's epoch) ran its tasks one at a time; each epoch paid for that second."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _stamp(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    t0 = time.time()
    time.sleep(0.3)
    return {"start": np.array([t0]), "end": np.array([time.time()])}


def test_a_short_execution_runs_tasks_side_by_side_from_the_start(ray_cluster: None) -> None:
    import ray.data

    from raysl.train.stream import data_defaults

    data_defaults()
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.resource_limits
    ctx.execution_options.resource_limits = ray.data.ExecutionResources(cpu=2)
    try:
        ds = ray.data.range(4, override_num_blocks=4).map_batches(_stamp, batch_size=None)
        rows = [(float(b["start"][i]), float(b["end"][i])) for b in ds.iter_batches(batch_format="numpy")
                for i in range(len(b["start"]))]
    finally:
        ctx.execution_options.resource_limits = saved
    assert len(rows) == 4
    overlapping = max(sum(1 for s, e in rows if s <= t < e) for t, _ in rows)
    # Four 0.3 s tasks on a 2-CPU budget: two at a time (one at a time without the fix: 1.2 s end to end)
    assert overlapping == 2, rows
