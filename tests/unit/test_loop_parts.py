"""Pieces of the training loop that decide what a step trains on: bad rows are dropped, counted and named, and
a batch with fewer than two good rows is replaced by the next one, never trained on as zeros."""

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from raysl.train.loop import _valid_batch


def batches(*valid: list[bool]) -> Iterator[dict[str, Any]]:
    start = 0
    for v in valid:
        n = len(v)
        yield {"view1": torch.arange(start, start + n).view(n, 1), "valid": torch.tensor(v),
               "key": np.array([f"k{i}" for i in range(start, start + n)])}
        start += n


def test_bad_rows_are_dropped_counted_and_named() -> None:
    counters = {"seen": 0, "bad_images": 0}
    out, keys = _valid_batch(batches([True, False, True, False, True]), counters)
    assert counters == {"seen": 5, "bad_images": 2} and keys == ["k1", "k3"]
    assert out["view1"].flatten().tolist() == [0, 2, 4] and out["key"].tolist() == ["k0", "k2", "k4"]


def test_a_batch_with_fewer_than_two_good_rows_is_replaced_by_the_next() -> None:
    counters = {"seen": 0, "bad_images": 0}
    out, keys = _valid_batch(batches([True, False, False], [False, True, True]), counters)
    assert out["view1"].flatten().tolist() == [4, 5]  # only images; no zero rows from the bad batch
    assert counters == {"seen": 6, "bad_images": 3} and keys == ["k1", "k2", "k3"]
