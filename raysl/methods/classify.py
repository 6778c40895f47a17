"""Classification fine-tuning as a method: the registered encoder (or the same network at random init) plus
a linear head, trained end to end with cross-entropy on the one training loop and launcher.

Being a Method gives fine-tuning everything the loop does for pretraining: workers, DDP, checkpoints and
resume, worker-failure recovery, bad-image counting, MLflow. Recipe choices follow the fine-tuning
protocols of the SSL papers (e.g. MAE, arXiv 2111.06377, §A.2): AdamW, warm-up + cosine, label smoothing,
optional layer-wise LR decay and a linear warm-up with the encoder frozen (LP-FT, arXiv 2202.10054).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import ray.data
import torch
import torch.nn as nn
import torch.nn.functional as F

from raysl.config import ClassifyConfig, PretrainConfig
from raysl.data.sources import Listing
from raysl.data.views import LabeledView, keep_keys, normalize
from raysl.methods.base import BatchFn, Method, method_config, register
from raysl.methods.downstream import frozen_at, layer_decay_groups, start_encoder
from raysl.models.backbones import eval_mode
from raysl.storage import S3Settings, read_bytes

MAX_HELD_SUBSET = 200_000  # subset rows held in the object store (encoded bytes); larger ones stream per epoch
MAX_REPEATS = 1000


@register
class Classifier(Method):
    name = "classify"
    required_columns = frozenset({"image", "label"})
    batch_columns = ("image", "label")
    export_full = True  # the head is part of what is registered: the version predicts classes
    export_overrides = {"init": "random", "init_weights": None, "subset_uri": None}

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        self.task = method_config(cfg, ClassifyConfig)
        self.mean, self.std = cfg.model.mean, cfg.model.std
        self.classes = list(self.task.classes)
        self.backbone = start_encoder(cfg, self.task)
        dim = int(self.backbone.num_features)  # type: ignore[arg-type]
        # Features standardized before the linear head (MAE's linear-probe head, arXiv 2111.06377 §A.2): an SSL
        # encoder's pooled features have arbitrary scales, and without it the head learned so slowly that a
        # frozen pretrained encoder reached 24% on held-out digits in 100 steps where logistic regression on
        # the same features reaches 68%.
        self.head_norm = nn.BatchNorm1d(dim, affine=False) if self.task.head_norm else nn.Identity()
        self.dropout = nn.Dropout(self.task.head_dropout)
        self.head = nn.Linear(dim, len(self.classes))
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.frozen = frozen_at(self.task, 1)

    @classmethod
    def build(cls, cfg: PretrainConfig) -> Classifier:
        return cls(cfg)

    @classmethod
    def view_transform(cls, cfg: PretrainConfig) -> BatchFn:
        t = method_config(cfg, ClassifyConfig)
        return LabeledView(cfg.model.image_size, cfg.data.max_image_pixels, classes=t.classes,
                           crop_scale=t.crop_scale, flip_p=t.flip_p, auto_augment=t.auto_augment)

    @classmethod
    def source_files(cls, cfg: PretrainConfig, s3: S3Settings, listing: Listing | None = None) -> list[str] | None:
        """A labeled subset is held and repeated as one stream (below), not read by file."""
        if method_config(cfg, ClassifyConfig).subset_uri is not None:
            return None
        return super().source_files(cfg, s3, listing)

    @classmethod
    def open_source(cls, cfg: PretrainConfig, s3: S3Settings, files: list[str] | None = None,
                    listing: Listing | None = None, *, paths: bool = False, read_tasks: int | None = None,
                    ) -> tuple[ray.data.Dataset, dict[str, int]]:
        """The labeled stream; with a labeled subset, only its rows, read once and repeated.

        A few-label subset makes an epoch a handful of steps, and every epoch of a Ray Data stream pays its
        start-up again (read, split, the first decode), which dominated such runs. Held in the object store (its
        encoded bytes only) and repeated so that one pass covers the run, the subset streams as one long epoch;
        augmentation still runs afresh on every repeat."""
        ds, counts = super().open_source(cfg, s3, files, listing, paths=paths, read_tasks=read_tasks)
        t = method_config(cfg, ClassifyConfig)
        if t.subset_uri is None:
            return ds, counts
        keys = frozenset(json.loads(read_bytes(t.subset_uri, s3)))
        ds = ds.map_batches(keep_keys, fn_kwargs={"keys": keys}, batch_format="numpy")  # type: ignore[arg-type]
        if len(keys) > MAX_HELD_SUBSET:
            return ds, counts
        held = ds.materialize()
        repeats = max(1, min(MAX_REPEATS, math.ceil(cfg.train.steps * cfg.train.batch_size / max(1, held.count()))))
        return (held.union(*[held] * (repeats - 1)) if repeats > 1 else held), {**counts, "subset_repeats": repeats}

    def collate(self, batch: dict[str, torch.Tensor], step: int, rank: int) -> dict[str, torch.Tensor]:
        self.frozen = frozen_at(self.task, step)  # from the step, so a resumed run freezes exactly as before
        return batch

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if not self.frozen:
            out: torch.Tensor = self.backbone(x)
            return out
        # Frozen: eval mode too, so BatchNorm statistics stay those of the encoder the head is fitted to.
        with eval_mode(self.backbone), torch.no_grad():
            out = self.backbone(x)
        return out

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) → class logits (B, C)."""
        feats = self.head_norm(self.features(normalize(images, self.mean, self.std)))
        return self.head(self.dropout(feats))  # type: ignore[no-any-return]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.logits(batch["image"])
        y = batch["label"].long()
        loss = F.cross_entropy(logits, y, label_smoothing=self.task.label_smoothing)
        return {"loss": loss, "train_top1": (logits.detach().argmax(1) == y).float().mean()}

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]] | None:
        return layer_decay_groups(self.backbone, self, weight_decay, self.task.layer_decay)

    def ddp_kwargs(self) -> dict[str, Any]:
        return {"find_unused_parameters": True} if self.task.freeze_steps else {}

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Class indices of uint8 images (N, 3, H, W), in eval mode."""
        device = next(self.parameters()).device
        with eval_mode(self):
            preds = [self.logits(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(device))
                     .argmax(1).cpu() for i in range(0, len(images), batch_size)]
        return torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)

    def online_metrics(self, data: dict[str, Any]) -> dict[str, float]:
        """Top-1 on the held-out split. Its labels index its own class list, mapped here to the head's."""
        index = {c: i for i, c in enumerate(self.classes)}
        names = np.asarray(data["classes"])[np.asarray(data["label"])]
        known = np.array([str(n) in index for n in names], dtype=bool)
        if not known.any():
            return {}
        y = np.array([index[str(n)] for n in names[known]])
        return {"test_top1": float((self.predict(np.asarray(data["image"])[known]) == y).mean())}

    def encoder(self) -> nn.Module:
        return self.backbone
