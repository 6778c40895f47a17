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
from raysl.eval.knn import split_knn


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
