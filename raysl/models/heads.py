"""Small heads written here because no kept library offers them as-is: the BYOL MLP."""

from __future__ import annotations

import torch.nn as nn


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """BYOL projector / predictor: Linear → BN → ReLU → Linear (paper §3.3)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out_dim),
    )
