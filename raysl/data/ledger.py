"""The tally the shard commands keep: a small Ray actor that shard tasks report to (kept, bytes, skipped).

A module of its own, with no torch import, so the actor starts in a moment (the tasks wait on it)."""

from __future__ import annotations

from typing import Any

import ray


@ray.remote(num_cpus=0)
class Ledger:
    """Tallies what the shard tasks kept and skipped."""

    def __init__(self) -> None:
        self.count = 0
        self.bytes = 0
        self.bad = 0
        self.examples: list[str] = []

    def add(self, count: int, nbytes: int, bad: list[str]) -> None:
        self.count += count
        self.bytes += nbytes
        self.bad += len(bad)
        self.examples = (self.examples + bad)[:20]

    def summary(self) -> dict[str, Any]:
        return {"count": self.count, "bytes": self.bytes, "bad": self.bad, "bad_examples": self.examples}
