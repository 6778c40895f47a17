"""The sides `raysl bench ingest` times: raysl's Ray Data training reader (`RaySide`) and a torch DataLoader
(`LoaderSide`), each a start-up pass then steady passes, with the CPU each pass used by process group."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from raysl.bench.common import cpu_seconds, cpu_used, drain, timed


class Side:
    """One way of reading a corpus: `first()` builds the pipeline and runs a pass, `again()` another pass."""

    startup_s: float
    delivered: int

    def __init__(self, n: int) -> None:
        self.n = n
        self.rates: list[float] = []
        self.cpu: list[dict[str, float]] = []  # per steady pass: CPU seconds by process group (cpu_seconds)

    def first(self) -> None:
        raise NotImplementedError

    def one_pass(self) -> int:
        raise NotImplementedError

    def again(self) -> None:
        before = cpu_seconds()
        seconds, _ = timed(self.one_pass)
        after = cpu_seconds()
        self.rates.append(self.n / seconds)
        self.cpu.append(cpu_used(before, after))

    def cpu_per_1000(self) -> dict[str, float]:
        """Median CPU seconds per 1,000 images of the steady passes, by process group."""
        return {k: round(1000 * float(np.median([c[k] for c in self.cpu])) / self.n, 3) for k in self.cpu[0]}

    def close(self) -> None:
        pass


class RaySide(Side):
    files: list[str]  # the corpus's files, listed once by `first()`
    open_epoch: Callable[[list[str], int], Iterator[dict[str, Any]]]  # set by `first()`

    def __init__(self, uri: str, image_px: int, batch_size: int, n: int) -> None:
        super().__init__(n)
        self.uri, self.image_px, self.batch_size = uri, image_px, batch_size
        self.epoch = 0

    def first(self) -> None:
        from raysl.config import parse_config
        from raysl.data.sources import data_files
        from raysl.train.stream import epoch_reader

        def build_and_pass() -> int:
            cfg = parse_config({"data": {"uri": self.uri}, "model": {"image_size": self.image_px}})
            self.files = data_files(cfg.data.uri, cfg.data.format)
            self.open_epoch = epoch_reader(cfg, self.batch_size, rank=0, world=1)
            return drain(self.open_epoch(self.files, 0))

        self.startup_s, self.delivered = timed(build_and_pass)

    def one_pass(self) -> int:
        self.epoch += 1
        return drain(self.open_epoch(self.files, self.epoch))


class LoaderSide(Side):
    def __init__(self, make: Callable[[], Any], n: int) -> None:
        super().__init__(n)
        self.make = make
        self.loader: Any = None

    def first(self) -> None:
        def build_and_pass() -> int:
            self.loader = self.make()
            return drain(iter(self.loader))

        self.startup_s, self.delivered = timed(build_and_pass)

    def one_pass(self) -> int:
        return drain(iter(self.loader))

    def close(self) -> None:
        self.loader = None  # its persistent workers stop with it
        gc.collect()
