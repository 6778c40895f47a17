"""Linear probe: multinomial logistic regression (scikit-learn, L-BFGS) on standardized frozen features."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits


def linear_probe_top1(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                      c: float = 1.0, max_iter: int = 1000) -> float:
    # One BLAS thread: L-BFGS on (samples × feature width) is hundreds of small matrix products, which more
    # threads barely speed up, while OpenBLAS's spinning threads slow them badly on a busy machine (a probe runs
    # next to Ray workers): 1,297 × 512 features of digits took 1 s with one thread, 90-130 s with two, on 2 cores.
    with threadpool_limits(limits=1, user_api="blas"):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
        clf.fit(train_x, train_y)
        return float((clf.predict(test_x) == test_y).mean())
