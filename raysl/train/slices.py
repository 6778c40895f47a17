"""A view transform applied to a whole Ray Data block in slices, each slice's output yielded as it is made.

Whole blocks go in (a batch size on `map_batches` would stop it fusing with the read), but a block is a file of
hundreds to thousands of images: transformed at once, its output would be one allocation of up to hundreds of MB
at 224 px. So the block is cut into slices. A slice's size is a trade: the batched augmentations (raysl.data.augment)
pay a fixed cost per call, per torch op, so small slices cost CPU, while big ones cost memory. The first slice of a
block is FIRST_ROWS rows; later ones are sized from its output to about SLICE_BYTES, between FIRST_ROWS and MAX_ROWS
rows. Measured (issue 12 note, 10,000 CIFAR images from Parquet, 2 CPUs, Ray task workers' CPU per 1,000 images):
64-row slices 0.68–0.69 s, 256-row slices 0.63, whole blocks of 1,250 rows 0.62; the same 64-row slices joined
into one output per block 0.66–0.67, so the cost is per transform call, not per output. At 224 px a row's output
is ~300 KB and slices stay at FIRST_ROWS.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

FIRST_ROWS = 64
MAX_ROWS = 256  # a training batch's worth, as a DataLoader's batched `__getitems__` would call it
SLICE_BYTES = 16 << 20  # a slice's output, at most (above FIRST_ROWS rows)
Transform = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class Slices:
    """`transform` over a whole block, a slice at a time: FIRST_ROWS rows, then as many as make about SLICE_BYTES of
    output (at most MAX_ROWS). A `path` column (raysl.train.span) goes around the transform, not through it."""

    def __init__(self, transform: Transform, first_rows: int = FIRST_ROWS, max_rows: int = MAX_ROWS,
                 slice_bytes: int = SLICE_BYTES) -> None:
        self.transform, self.first_rows = transform, first_rows
        self.max_rows, self.slice_bytes = max(first_rows, max_rows), slice_bytes

    def _next_rows(self, out: dict[str, np.ndarray], rows: int) -> int:
        per_row = sum(np.asarray(v).nbytes for v in out.values()) / max(1, rows)
        return int(min(self.max_rows, max(self.first_rows, self.slice_bytes // max(1.0, per_row))))

    def __call__(self, block: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        n = len(next(iter(block.values()))) if block else 0
        path = block.pop("path", None)
        i, rows = 0, self.first_rows
        while i < n:
            take = min(rows, n - i)
            out = self.transform({k: v[i:i + take] for k, v in block.items()})
            if path is not None:
                if len(next(iter(out.values()))) != take:
                    raise ValueError("a view transform that adds or drops rows cannot read several epochs at once "
                                     "(set epoch_spans = False on its method)")
                out["path"] = path[i:i + take]
            rows = self._next_rows(out, take)
            i += take
            yield out
