"""Linear probe: multinomial logistic regression (scikit-learn, L-BFGS) on standardized frozen features."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def linear_probe_top1(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                      c: float = 1.0, max_iter: int = 1000) -> float:
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    clf.fit(train_x, train_y)
    return float((clf.predict(test_x) == test_y).mean())
