"""Weighted kNN classifier on frozen features (k=20, cosine, votes exp(sim/T), T=0.07; as in solo-learn),
and the feature extraction it scores (uint8 images → an encoder's features, in eval mode)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from raysl.data.views import normalize
from raysl.models.backbones import eval_mode


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


@torch.no_grad()
def extract(encoder: nn.Module, images: np.ndarray, mean: Any, std: Any, device: torch.device,
            batch_size: int = 256) -> torch.Tensor:
    """Features (N, D) of uint8 images (N, 3, H, W) with the encoder in eval mode."""
    feats = []
    with eval_mode(encoder):
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(images[i : i + batch_size]).to(device)
            feats.append(encoder(normalize(x, mean, std)).float().cpu())
    return torch.cat(feats)


def split_knn(encoder: nn.Module, images: np.ndarray, labels: torch.Tensor, mean: Any, std: Any,
              device: torch.device, k: int = 20) -> float:
    """kNN top-1 of `encoder` on a labeled split: even-indexed samples are the bank, odd ones the queries."""
    f = extract(encoder, images, mean, std, device)
    return knn_top1(f[0::2], labels[0::2], f[1::2], labels[1::2], k=k)
