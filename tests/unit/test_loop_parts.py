"""Pieces of the training loop that decide what a step does: bad rows and non-finite gradients."""

import numpy as np
import torch
import torch.nn as nn

from raysl.train.loop import _filter_valid, _grads_finite


def test_bad_rows_are_dropped_counted_and_named() -> None:
    batch = {"view1": torch.arange(5).view(5, 1), "view2": torch.arange(5).view(5, 1),
             "valid": torch.tensor([True, False, True, False, True]), "key": np.array(list("abcde"))}
    out, n_bad, keys = _filter_valid(batch, ("view1", "view2"))
    assert n_bad == 2 and keys == ["b", "d"]
    assert out["view1"].flatten().tolist() == [0, 2, 4] and set(out) == {"view1", "view2"}


def test_nearly_all_bad_batch_is_kept_whole() -> None:
    batch = {"view1": torch.zeros(3, 1), "valid": torch.tensor([True, False, False]), "key": np.array(list("abc"))}
    out, n_bad, _ = _filter_valid(batch, ("view1",))
    assert n_bad == 2 and len(out["view1"]) == 3  # BatchNorm needs two rows; ranks must stay in step


def test_non_finite_gradient_is_detected() -> None:
    lin = nn.Linear(3, 1)
    (lin(torch.ones(1, 3)) * float("nan")).sum().backward()
    assert not _grads_finite(list(lin.parameters()))
    lin.zero_grad()
    lin(torch.ones(1, 3)).sum().backward()
    assert _grads_finite(list(lin.parameters()))
