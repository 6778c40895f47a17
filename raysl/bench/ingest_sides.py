"""The sides `raysl bench ingest` times: raysl's Ray Data training reader (`RaySide`) and a torch DataLoader
(`LoaderSide`), each a start-up pass then steady passes, with the CPU each pass used by process group.

A pass is `epochs` epochs back to back, the same number on every side: the training reader reads that many small
epochs in one execution (raysl.train.span), so a pass is one whole execution and none runs on while another side is
timed. Start-up is the time from building a side's pipeline to the end of its first epoch."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import numpy as np

from raysl.bench.common import cpu_seconds, cpu_used, drain, timed


class Side:
    """One way of reading a corpus: `first()` builds the pipeline and runs a pass, `again()` another pass."""

    startup_s: float
    delivered: int

    def __init__(self, n: int, epochs: int) -> None:
        self.n, self.epochs = n, epochs
        self.rates: list[float] = []
        self.cpu: list[dict[str, float]] = []  # per steady pass: CPU seconds by process group (cpu_seconds)

    def build(self) -> None:
        raise NotImplementedError

    def epoch(self) -> int:
        """One epoch: the images delivered."""
        raise NotImplementedError

    def pass_epochs(self) -> int:
        return self.epochs

    def first(self) -> None:
        """Build, then a first pass; start-up is the time to the end of its first epoch."""
        k = 0

        def build_and_epoch() -> int:
            nonlocal k
            self.build()
            k = self.pass_epochs()
            return self.epoch()

        self.startup_s, self.delivered = timed(build_and_epoch)
        for _ in range(k - 1):
            self.epoch()

    def again(self) -> None:
        k = self.pass_epochs()
        before = cpu_seconds()
        seconds, _ = timed(lambda: [self.epoch() for _ in range(k)])
        after = cpu_seconds()
        self.rates.append(k * self.n / seconds)
        self.cpu.append({g: c / k for g, c in cpu_used(before, after).items()})  # per epoch

    def cpu_per_1000(self) -> dict[str, float]:
        """Median CPU seconds per 1,000 images of the steady passes, by process group."""
        return {k: round(1000 * float(np.median([c[k] for c in self.cpu])) / self.n, 3) for k in self.cpu[0]}

    def close(self) -> None:
        pass


class RaySide(Side):
    """raysl's training reader as a worker runs it: `epoch_reader` in a `WorkerStream`'s epoch order."""

    reader: Any  # set by `build()`
    files: list[str]

    def __init__(self, uri: str, image_px: int, batch_size: int, n: int, epochs: int) -> None:
        super().__init__(n, epochs)
        self.uri, self.image_px, self.batch_size = uri, image_px, batch_size
        self.at = 0

    def plan(self, epoch: int) -> list[str]:
        from raysl.train.stream import epoch_files

        return epoch_files(self.files, 0, epoch, 0, 1)[0]

    def build(self) -> None:
        from raysl.config import parse_config
        from raysl.data.sources import data_files
        from raysl.train.stream import epoch_reader

        cfg = parse_config({"data": {"uri": self.uri}, "model": {"image_size": self.image_px}})
        self.files = data_files(cfg.data.uri, cfg.data.format)
        self.reader = epoch_reader(cfg, self.batch_size, rank=0, world=1)
        if hasattr(self.reader, "follow"):
            self.reader.follow(self.plan)

    def pass_epochs(self) -> int:
        """The epochs of the reader's next execution (a span), so a pass never stops inside one."""
        span_length = getattr(self.reader, "span_length", None)
        return 1 if span_length is None else int(span_length(self.plan(self.at), self.at))

    def epoch(self) -> int:
        self.at += 1
        return drain(self.reader(self.plan(self.at - 1), self.at - 1))

    def close(self) -> None:
        if hasattr(self, "reader") and hasattr(self.reader, "close"):
            self.reader.close()


class LoaderSide(Side):
    def __init__(self, make: Callable[[], Any], n: int, epochs: int) -> None:
        super().__init__(n, epochs)
        self.make = make
        self.loader: Any = None

    def build(self) -> None:
        self.loader = self.make()

    def epoch(self) -> int:
        return drain(iter(self.loader))

    def close(self) -> None:
        self.loader = None  # its persistent workers stop with it
        gc.collect()
