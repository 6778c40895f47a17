"""Few-label fine-tuning on digits, in-process: a short BYOL pretraining, then the same classify recipe from the
pretrained encoder and from random init, scored on 500 held-out digits.

The measurements behind `tests/integration/test_s3_end_to_end.py`'s fine-tuning margin (its BYOL recipe, 10%
of the labels, stratified and seeded as `raysl finetune` draws them). Each variant is
`freeze_steps,lr,steps,crop_min,flip_p,data_order`:
    .venv/bin/python infra/experiments/finetune_digits.py 20,1e-3,60,0.8,0,1 30,1e-3,100,0.35,0.5,1
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import numpy as np
import torch

from raysl.config import parse_config
from raysl.data.views import EvalView
from raysl.demo import shuffled_digits
from raysl.eval.finetune import stratified_subset
from raysl.train.local import pretrain_in_process

MODEL = {"backbone": "resnet18", "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}


def byol_encoder(images: np.ndarray, steps: int) -> dict[str, torch.Tensor]:
    cfg = parse_config({
        "data": {"uri": "/unused"}, "model": MODEL,
        "method": {"projector_hidden": 512, "predictor_hidden": 512,
                   "views": {"crop_scale": [0.3, 1.0], "flip_p": 0.0}},
        "optim": {"name": "adamw", "lr": 2e-3, "scale_lr": False, "weight_decay": 1e-4, "warmup_steps": 5},
        "train": {"steps": steps, "batch_size": 64, "torch_threads": 1}})
    method, _ = pretrain_in_process(cfg, images)
    return {k: v.contiguous() for k, v in method.encoder().state_dict().items()}


def classify_tree(classes: list[str], init: str, weights: str | None, variant: str) -> dict[str, Any]:
    freeze, lr, steps, crop_min, flip_p, _ = variant.split(",")
    return {"data": {"uri": "/unused"}, "model": MODEL,
            "method": {"name": "classify", "classes": classes, "init": init, "init_weights": weights,
                       "freeze_steps": int(freeze), "layer_decay": 0.75, "label_fraction": 0.1,
                       "crop_scale": [float(crop_min), 1.0], "flip_p": float(flip_p)},
            "optim": {"name": "adamw", "lr": float(lr), "scale_lr": False, "weight_decay": 0.05,
                      "warmup_steps": max(1, int(steps) // 10)},
            "train": {"steps": int(steps), "batch_size": 64, "seed": 0}}


def main() -> None:
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--byol-steps", type=int, default=30)
    ap.add_argument("--weights", default="/tmp/finetune_digits_encoder.safetensors")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    pngs, labels, _ = shuffled_digits()
    names = np.array([str(y) for y in labels])
    train, test = np.arange(500, len(pngs)), np.arange(500)
    save_file(byol_encoder(pngs[train], args.byol_steps), args.weights)
    keys = np.array([f"k{i}" for i in train])
    picked = set(stratified_subset(keys, names[train], 0.1, 0))
    subset = np.array([i for i in train if f"k{i}" in picked])
    classes = sorted(set(names.tolist()))
    test_images = EvalView(32, 10**8)({"image": pngs[test], "key": test.astype(str)})["image"]
    for variant in args.variants:
        top1 = {}
        for init in ("pretrained", "random"):
            cfg = parse_config(classify_tree(classes, init, args.weights if init == "pretrained" else None, variant))
            model, _ = pretrain_in_process(cfg, pngs[subset], labels=names[subset],
                                           sample_seed=int(variant.split(",")[-1]))
            top1[init] = float((np.array(classes)[model.predict(test_images)] == names[test]).mean())  # type: ignore[operator]
        print(f"{variant}: pretrained {top1['pretrained']:.3f}  random {top1['random']:.3f}  "
              f"({len(subset)} labeled)", flush=True)


if __name__ == "__main__":
    main()
