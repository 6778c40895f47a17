"""One run of a pipeline at a time: the generic `raysl.lock.RunLock` on `<state>/<name>/lock.json`, its
messages naming "another run of this pipeline" (kept here so pipeline code and the CLI keep their import)."""

from __future__ import annotations

from raysl.lock import LockHeld, RunLock, held_by

__all__ = ["LockHeld", "PipelineLock", "held_by"]


class PipelineLock(RunLock):
    """A `RunLock` whose refusal reads "another run of this pipeline holds …"."""

    what = "run of this pipeline"
