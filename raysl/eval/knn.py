"""Weighted kNN classifier on frozen features (k=20, cosine, votes exp(sim/T), T=0.07; as in solo-learn)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, *, k: int = 20,
                temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Predict labels of test_x (M, D) from the bank train_x (N, D) with integer labels train_y (N,)."""
    bank = F.normalize(train_x.float(), dim=1)
    n_cls = int(train_y.max()) + 1
    k = min(k, bank.shape[0])
    preds = []
    for q in F.normalize(test_x.float(), dim=1).split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (m, k)
        votes = torch.zeros(q.shape[0], n_cls, dtype=torch.float32)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_top1(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
             k: int = 20, temperature: float = 0.07) -> float:
    pred = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature)
    return float((pred == test_y).float().mean())
