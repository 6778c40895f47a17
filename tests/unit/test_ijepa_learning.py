"""I-JEPA learns: a short pretraining on digits beats the same ViT at random init on a held-out kNN.

In-process (`raysl.train.local`: the loop's optimizer, LR and weight-decay schedules, masks and momentum
update, in the loop's order, without Ray) so that it fits the suite's budget. Labels are used only by the
kNN: the bank is the pretraining images, the queries are 500 digits never trained on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from raysl.config import PretrainConfig, parse_config
from raysl.data.views import EvalView
from raysl.demo import demo_config, shuffled_digits
from raysl.eval.knn import extract, knn_top1
from raysl.methods import get_method
from raysl.train.local import pretrain_in_process

STEPS = 200


def _config(**method: object) -> PretrainConfig:
    """The demo's I-JEPA recipe (a narrow 4-block ViT, ~0.3 s a step on 2 cores), at batch 64."""
    tree = demo_config({"train": Path("/unused"), "test": Path("/unused")}, Path("/unused"), STEPS, "ijepa")
    tree["method"].update(method)
    tree["train"].update(batch_size=64, seed=0)
    return parse_config(tree)


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    pngs, labels, order = shuffled_digits()
    images = EvalView(32, 10**8)({"image": pngs, "key": order.astype(str)})["image"]
    return {"png": pngs, "image": images, "label": labels}


def _held_out_knn(encoder: torch.nn.Module, digits: dict[str, np.ndarray], cfg: PretrainConfig) -> float:
    f = extract(encoder, digits["image"], cfg.model.mean, cfg.model.std, torch.device("cpu"))
    y = torch.as_tensor(digits["label"])
    return knn_top1(f[500:], y[500:], f[:500], y[:500])


def test_short_pretraining_beats_random_init_on_held_out_knn(digits: dict[str, np.ndarray]) -> None:
    # Measured here (200 steps): random init 0.560; context encoder 0.588-0.654 and EMA target 0.586-0.598 over
    # three runs while the views were unseeded (CI's failed run was the 0.588), 0.632 / 0.594 with the seeded views
    # of pretrain_in_process (the same on every rerun here). In short runs the target lags (it averages in the
    # weights of the first steps, whose features dip below random init), so the context encoder carries the
    # margin and the target must at least beat random init. The margins hold for every draw seen, so a machine
    # whose floating point takes another path still passes; an encoder that did not learn does not.
    cfg = _config(export_encoder="context")
    torch.manual_seed(0)
    random_init = _held_out_knn(get_method("ijepa").build(cfg).encoder(), digits, cfg)
    model, losses = pretrain_in_process(cfg, digits["png"][500:])  # never the held-out 500
    context = _held_out_knn(model.encoder(), digits, cfg)
    target = _held_out_knn(model.target_encoder, digits, cfg)
    print(f"held-out kNN: random init {random_init:.3f}, context {context:.3f}, target {target:.3f}")
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), losses
    assert context > random_init + 0.02, (context, target, random_init)
    assert target > random_init + 0.01, (context, target, random_init)
