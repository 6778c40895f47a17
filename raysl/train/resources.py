"""Fail in bounded time when the cluster cannot fit a run's workers, instead of letting Ray Train retry the
worker-group start for ever.

The check reserves the same bundles Ray Train will ask for (a placement group), waits up to
`train.placement_timeout_s` for them (an autoscaling cluster may add nodes meanwhile), then hands them back.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from raysl.train.errors import ClusterTooSmall

log = logging.getLogger(__name__)



def _fmt(resources: dict[str, Any]) -> str:
    keys = ("CPU", "GPU", "memory")
    return ", ".join(f"{k}={resources[k]:g}" for k in keys if k in resources and k != "memory") or "nothing"


def check_fits(num_workers: int, cpus: float, gpus: float, timeout_s: float) -> None:
    """Return once `num_workers` bundles of {CPU: cpus, GPU: gpus} can be placed; else ClusterTooSmall."""
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    pg = placement_group([dict(bundle) for _ in range(num_workers)], strategy="PACK")
    try:
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if ready:
            return
        total, free = ray.cluster_resources(), ray.available_resources()
        raise ClusterTooSmall(
            f"train.num_workers={num_workers} × {{{_fmt(bundle)}}} does not fit this Ray cluster within "
            f"train.placement_timeout_s={timeout_s:g}: asked CPU={num_workers * cpus:g}"
            + (f", GPU={num_workers * gpus:g}" if gpus else "")
            + f"; the cluster has {_fmt(total)} in all, {_fmt(free)} free now. Lower train.num_workers or "
              "train.cpus_per_worker, or add nodes")
    finally:
        remove_placement_group(pg)
