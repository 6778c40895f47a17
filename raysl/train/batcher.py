"""A span's rows back into epochs, and each epoch's rows into shuffled batches (raysl.train.span).

`EpochSplitter` tags the rows of an ordered multi-epoch read with their epoch by walking the planned file sequence,
and says when an epoch is complete: at the first row of a later file, or, where the row count of the epoch's last
file is known (raysl.data.file_rows), as soon as that many of its rows are in. `EpochBatcher` turns one epoch's rows
into full shuffled batches whose content depends only on the rows' order and the seed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

Batch = dict[str, Any]


class EpochBatcher:
    """One epoch's rows → shuffled full batches, drawn at random from a buffer of `buffer_rows + batch_size` rows;
    the partial batch left at the end is dropped. The output depends only on the rows' order and the seed, not on
    how the rows arrive in blocks (each draw happens at a fixed row count)."""

    def __init__(self, batch_size: int, buffer_rows: int, rng: np.random.Generator) -> None:
        self.bs, self.cap, self.rng = batch_size, batch_size + max(0, buffer_rows), rng
        self.buf: dict[str, np.ndarray] = {}
        self.filled = 0

    def _alloc(self, rows: Batch) -> None:
        for k, v in rows.items():
            v = np.asarray(v)
            # strings go into an object buffer: a fixed-width one would cut longer strings of later blocks
            dtype = object if v.dtype.kind in "OUS" else v.dtype
            self.buf[k] = np.empty((self.cap, *v.shape[1:]), dtype=dtype)

    def add(self, rows: Batch) -> Iterator[Batch]:
        n = len(next(iter(rows.values()))) if rows else 0
        if n and not self.buf:
            self._alloc(rows)
        at = 0
        while at < n:
            take = min(n - at, self.cap - self.filled)
            for k, v in rows.items():
                self.buf[k][self.filled:self.filled + take] = np.asarray(v)[at:at + take]
            self.filled, at = self.filled + take, at + take
            if self.filled == self.cap:
                yield self._draw()

    def _draw(self) -> Batch:
        idx = np.sort(self.rng.choice(self.cap, self.bs, replace=False))
        out = {k: v[idx] for k, v in self.buf.items()}
        keep = self.cap - self.bs  # rows past `keep` that were not drawn move into the drawn slots below it
        holes = idx[idx < keep]
        movers = np.setdiff1d(np.arange(keep, self.cap), idx, assume_unique=True)
        for v in self.buf.values():
            v[holes] = v[movers]
        self.filled = keep
        return out

    def finish(self) -> Iterator[Batch]:
        order = self.rng.permutation(self.filled)
        for i in range(0, self.filled - self.bs + 1, self.bs):
            yield {k: v[order[i:i + self.bs]] for k, v in self.buf.items()}
        self.buf, self.filled = {}, 0


class EpochSplitter:
    """Tags the rows of an ordered multi-epoch read with their epoch by walking the planned file sequence.

    `counts`: rows in a file, where known (filled while the read runs; read, never written, here). An epoch is
    complete when the rows of its last file are all in; without a count that is known only when a row of a later
    file arrives, which is one read task later (a whole file's read, as the read tasks hand over whole files)."""

    def __init__(self, epochs: list[tuple[int, list[str]]], counts: Mapping[str, int] | None = None) -> None:
        self.seq = [(e, f) for e, files in epochs for f in files]
        ends = np.cumsum([len(fs) for _, fs in epochs]) - 1
        self.closing = {int(i) for i, (_, fs) in zip(ends, epochs, strict=True) if fs}  # positions of last files
        self.counts: Mapping[str, int] = counts if counts is not None else {}
        self.at = 0
        self.at_rows = 0  # rows of seq[at] seen so far
        self.rows = 0  # rows seen so far, and of how many planned files (`at + 1`)
        self.bytes = 0  # their output bytes (the view transform's)

    def split(self, paths: np.ndarray) -> Iterator[tuple[int, int, int]]:
        """(epoch, first row, end row) runs of a block's rows, in order."""
        n = len(paths)
        self.rows += n
        cuts = [0, *(np.flatnonzero(paths[1:] != paths[:-1]) + 1).tolist(), n]
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            path = str(paths[a])
            while self.at < len(self.seq) and self.seq[self.at][1] != path:
                self.at, self.at_rows = self.at + 1, 0  # on to the next planned file (some yield no rows)
            if self.at == len(self.seq):
                raise RuntimeError(f"span read: a row of {path!r} came after the planned files (rows out of order)")
            self.at_rows += b - a
            yield self.seq[self.at][0], a, b

    def epoch_complete(self) -> bool:
        """Whether the rows seen so far end an epoch: the file they stopped in closes its epoch and has a known
        row count that they have reached."""
        if self.at not in self.closing:
            return False
        return self.counts.get(self.seq[self.at][1]) == self.at_rows

    def overrun(self, path: str) -> str:
        """The error text for rows of `path` past its count (its epoch already ended on that count)."""
        return (f"span read: {path!r} yielded more rows than the {self.counts.get(path)} counted in it before the "
                "read (was it rewritten while the run read it?)")
