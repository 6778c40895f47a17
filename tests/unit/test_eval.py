"""kNN (weighted votes) and the linear probe on features with known structure."""

import numpy as np
import torch

from raysl.eval.knn import knn_predict, knn_top1
from raysl.eval.linear_probe import linear_probe_top1


def _clusters(n: int, d: int = 16, classes: int = 4, noise: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d))
    y = rng.integers(0, classes, n)
    return (centers[y] + noise * rng.normal(size=(n, d))).astype(np.float32), y


def test_knn_separable_clusters() -> None:
    x, y = _clusters(400)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    assert knn_top1(tx[:300], ty[:300], tx[300:], ty[300:]) > 0.97


def test_knn_random_labels_near_chance() -> None:
    x, _ = _clusters(600)
    y = torch.from_numpy(np.random.default_rng(1).integers(0, 4, 600))
    acc = knn_top1(torch.from_numpy(x[:400]), y[:400], torch.from_numpy(x[400:]), y[400:])
    assert acc < 0.45


def test_knn_votes_are_similarity_weighted() -> None:
    # Query is nearly identical to one class-1 sample but has two moderately similar class-0 neighbours:
    # with exp(sim/T) weighting, the near-duplicate wins; a plain majority vote would pick class 0.
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([1, 0, 0])
    pred = knn_predict(bank, labels, torch.tensor([[1.0, 0.01]]), k=3, temperature=0.07)
    assert pred.tolist() == [1]


def test_linear_probe_learns_and_fails_on_noise() -> None:
    x, y = _clusters(400, noise=1.0)
    assert linear_probe_top1(x[:300], y[:300], x[300:], y[300:]) > 0.9
    y_rand = np.random.default_rng(2).integers(0, 4, 400)
    assert linear_probe_top1(x[:300], y_rand[:300], x[300:], y_rand[300:]) < 0.45
