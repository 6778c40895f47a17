"""I-JEPA in short runs, in-process: held-out kNN of the EMA target and the context encoder vs random init.

The diagnostics behind the README's "Short runs" paragraph. Digits (sklearn: 1,297 to pretrain on, 500
held out) or ../shared/data/cifar10-10k (800 + 200 per class); the kNN bank is the pretraining images.
    .venv/bin/python infra/experiments/ijepa_short_runs.py --data digits --steps 200 --every 50 \
        'model.backbone_kwargs={depth: 6}' optim.lr=1e-3 optim.warmup_steps=20 method.momentum=[1.0,1.0]
Overrides apply to the ijepa-cifar-cpu recipe (digits also get mean/std 0.5 and no flips).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import cast

import numpy as np
import torch

from raysl.config import load_config
from raysl.data.views import EvalView
from raysl.eval.knn import extract, knn_top1
from raysl.methods import get_method
from raysl.methods.base import Method
from raysl.methods.ijepa import IJEPA
from raysl.train.local import pretrain_in_process

log = logging.getLogger("ijepa_short_runs")


def load(data: str, cifar_root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train bytes, train labels, held-out bytes, held-out labels)."""
    if data == "digits":
        from raysl.demo import shuffled_digits

        pngs, labels, _ = shuffled_digits()
        return pngs[500:], labels[500:], pngs[:500], labels[:500]
    tr: list[bytes] = []
    te: list[bytes] = []
    tr_y: list[int] = []
    te_y: list[int] = []
    for label, folder in enumerate(sorted(p for p in cifar_root.iterdir() if p.is_dir())):
        for j, f in enumerate(sorted(folder.glob("*.jpg"))):
            (tr if j < 800 else te).append(f.read_bytes())
            (tr_y if j < 800 else te_y).append(label)
    return np.array(tr, dtype=object), np.array(tr_y), np.array(te, dtype=object), np.array(te_y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["digits", "cifar"], default="digits")
    p.add_argument("--cifar-root", type=Path, default=Path("../shared/data/cifar10-10k"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    base = ["data.uri=unused", f"train.steps={args.steps}", f"train.log_every={max(1, args.every // 2)}"]
    if args.data == "digits":
        base += ["model.mean=[0.5,0.5,0.5]", "model.std=[0.5,0.5,0.5]", "method.flip_p=0"]
    cfg = load_config("ijepa-cifar-cpu", base + args.overrides)
    tr, tr_y, te, te_y = load(args.data, args.cifar_root)
    view = EvalView(cfg.model.image_size, 10**8)
    tr_img = view({"image": tr, "key": np.arange(len(tr)).astype(str)})["image"]
    te_img = view({"image": te, "key": np.arange(len(te)).astype(str)})["image"]

    def knn(encoder: torch.nn.Module) -> float:
        cpu = torch.device("cpu")
        f_tr = extract(encoder, tr_img, cfg.model.mean, cfg.model.std, cpu)
        f_te = extract(encoder, te_img, cfg.model.mean, cfg.model.std, cpu)
        return knn_top1(f_tr, torch.as_tensor(tr_y), f_te, torch.as_tensor(te_y))

    def on_step(step: int, method: Method, metrics: dict[str, float]) -> None:
        ij = cast(IJEPA, method)
        if step % args.every == 0:
            log.info("step %d loss %.4f target_std %.3f tau %.4f | kNN target %.4f context %.4f", step,
                     metrics["loss"], metrics["target_std"], metrics["tau"], knn(ij.target_encoder),
                     knn(ij.context_encoder))

    torch.manual_seed(cfg.train.seed)  # the same initial weights pretrain_in_process starts from
    log.info("random init: kNN %.4f", knn(get_method("ijepa").build(cfg).encoder()))
    pretrain_in_process(cfg, tr, on_step=on_step)


if __name__ == "__main__":
    main()
