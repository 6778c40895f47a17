"""Online kNN top-1 on a small labeled split while training runs (rank 0 only).

The driver reads the split once (Ray Data) and hands it over as an object ref; even-indexed samples
form the kNN bank and odd-indexed ones are queried.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray
import torch
import torch.nn as nn

from raysl.config import PretrainConfig
from raysl.data.views import normalize
from raysl.eval.knn import knn_top1


@torch.no_grad()
def extract(encoder: nn.Module, images: np.ndarray, mean: Any, std: Any, device: torch.device,
            batch_size: int = 256) -> torch.Tensor:
    """Features (N, D) of uint8 images (N, 3, H, W) with the encoder in eval mode."""
    was_training = encoder.training
    encoder.eval()
    feats = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size]).to(device)
        feats.append(encoder(normalize(x, mean, std)).float().cpu())
    encoder.train(was_training)
    return torch.cat(feats)


def split_knn(encoder: nn.Module, images: np.ndarray, labels: torch.Tensor, mean: Any, std: Any,
              device: torch.device, k: int = 20) -> float:
    """kNN top-1 of `encoder` on a labeled split: even-indexed samples are the bank, odd ones the queries."""
    f = extract(encoder, images, mean, std, device)
    return knn_top1(f[0::2], labels[0::2], f[1::2], labels[1::2], k=k)


class OnlineKNN:
    def __init__(self, data: dict[str, Any], cfg: PretrainConfig) -> None:
        self.data = data  # image, label, classes[, caption]: what a method's own online metrics may use
        self.images, self.labels = np.array(data["image"]), torch.tensor(np.array(data["label"]), dtype=torch.long)
        self.mean, self.std, self.k = cfg.model.mean, cfg.model.std, cfg.eval.k

    @classmethod
    def from_ref(cls, ref: Any, cfg: PretrainConfig) -> OnlineKNN | None:
        if ref is None:
            return None
        return cls(dict(ray.get(ref)), cfg)

    def evaluate(self, encoder: nn.Module, device: torch.device) -> float:
        return split_knn(encoder, self.images, self.labels, self.mean, self.std, device, self.k)
