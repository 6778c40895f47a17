"""Image↔text recall: repeated caption texts are one candidate (image→text) and one query (text→image),
and unique captions score exactly as the plain pairwise recall did."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysl.eval.zero_shot import retrieval_recall

# 6 images, 3 distinct texts each used twice: images 0,1 carry "A", 2,3 carry "B", 4,5 carry "C".
CAPTIONS = ["a photo of A", "a photo of A", "a photo of B", "a photo of B", "a photo of C", "a photo of C"]
# similarity of each image to the texts (A, B, C); the text embeddings are the unit axes, so sim = these rows
SIM = torch.tensor([
    [0.9, 0.1, 0.0],  # image 0 (A): A first                 → rank 0
    [0.2, 0.8, 0.1],  # image 1 (A): B above A                → rank 1
    [0.1, 0.7, 0.3],  # image 2 (B): B first                  → rank 0
    [0.6, 0.5, 0.4],  # image 3 (B): A above B                → rank 1
    [0.5, 0.3, 0.2],  # image 4 (C): A and B above C          → rank 2
    [0.1, 0.2, 0.9],  # image 5 (C): C first                  → rank 0
])
TXT = torch.eye(3)[[0, 0, 1, 1, 2, 2]]  # caption i's embedding: copies of one text are identical


def _pairwise(img: torch.Tensor, txt: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """Reference: caption i belongs to image i only; every other caption is a wrong candidate."""
    sim = (img @ txt.T).numpy()
    out = {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        rank = np.array([(row > row[i]).sum() for i, row in enumerate(s)])
        out.update({f"{name}_recall_at_{k}": float((rank < k).mean()) for k in ks})
    return out


def test_duplicated_captions_rank_distinct_texts() -> None:
    got = retrieval_recall(SIM, TXT, ks=(1, 2, 3), captions=CAPTIONS)
    # image→text ranks per image: 0, 1, 0, 1, 2, 0 among the 3 distinct texts
    assert got["i2t_recall_at_1"] == pytest.approx(3 / 6)
    assert got["i2t_recall_at_2"] == pytest.approx(5 / 6)
    assert got["i2t_recall_at_3"] == 1.0  # K ≥ the number of distinct texts: every image finds its text
    # text→image, one query per distinct text, any image carrying it counts:
    # A: images 0 (0.9) best, nothing wrong above → 0; B: best right is image 2 (0.7), image 1 (0.8) above → 1;
    # C: image 5 (0.9) best → 0
    assert got["t2i_recall_at_1"] == pytest.approx(2 / 3)
    assert got["t2i_recall_at_2"] == 1.0


def test_duplicates_no_longer_flatten_recall_at_k() -> None:
    """Counting both copies of "B" as wrong answers put image 1 at rank 2, not 1 (the bug: R@1 = R@5 = R@10)."""
    per_copy = _pairwise(SIM, TXT, ks=(2,))
    assert per_copy["i2t_recall_at_2"] < retrieval_recall(SIM, TXT, ks=(2,), captions=CAPTIONS)["i2t_recall_at_2"]


def test_templated_captions_give_rising_recall() -> None:
    """Ten classes, fifty images each, one caption per class: recall must rise with K and reach 1 at K = 10."""
    gen = torch.Generator().manual_seed(0)
    cls = torch.nn.functional.normalize(torch.randn(10, 32, generator=gen), dim=-1)
    labels = torch.arange(500) % 10
    img = torch.nn.functional.normalize(cls[labels] + 1.2 * torch.randn(500, 32, generator=gen), dim=-1)
    got = retrieval_recall(img, cls[labels], ks=(1, 5, 10), captions=[f"a photo of a {int(c)}" for c in labels])
    assert 0.1 < got["i2t_recall_at_1"] < got["i2t_recall_at_5"] < got["i2t_recall_at_10"] == 1.0
    assert got["t2i_recall_at_1"] <= got["t2i_recall_at_5"] <= got["t2i_recall_at_10"]


def test_copies_that_differ_score_by_their_mean() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # images 0 and 1 carry "x", image 2 "y"
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.7]])  # two copies of "x" that differ, then "y"
    got = retrieval_recall(img, txt, ks=(1,), captions=["x", "x", "y"])
    # image 1: "x" scores the mean (0 + 1) / 2 = 0.5 < "y" 0.7 → miss (the max, 1.0, would have hit)
    assert got["i2t_recall_at_1"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("with_captions", [False, True])
def test_unique_captions_score_as_plain_pairs(with_captions: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(40, 8, generator=gen), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(40, 8, generator=gen), dim=-1)
    # unsorted unique texts: their sorted order (how texts are grouped) differs from the pair order
    captions = [f"caption {(7 * i) % 40}" for i in range(40)] if with_captions else None
    ks = (1, 5, 10)
    got = retrieval_recall(img, txt, ks=ks, captions=captions)
    assert got == pytest.approx(_pairwise(img, txt, ks))
    assert 0.0 < got["i2t_recall_at_1"] < 1.0  # not a degenerate case
