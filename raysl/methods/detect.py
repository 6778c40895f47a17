"""Object detection as a method: a torchvision detector (Faster R-CNN, RetinaNet or FCOS) around the registered
encoder — an FPN over a CNN's stages, or ViTDet's simple pyramid over a ViT (raysl.models.detection) — trained
on COCO-format data on the one training loop and launcher, so checkpoints, resume, worker recovery, bad-image
counting and MLflow come with it. Detection fine-tuning of SSL backbones: e.g. arXiv 2112.10740, 2410.07442.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray.data
import torch
import torch.nn as nn

from raysl.config import DetectConfig, PretrainConfig
from raysl.data.detection import DetectionView, parse_coco, read_coco, unpad_targets
from raysl.data.sources import Listing
from raysl.methods.base import BatchFn, Method, method_config, register
from raysl.methods.downstream import layer_decay_groups, start_encoder
from raysl.models.backbones import eval_mode
from raysl.models.detection import build_detector
from raysl.storage import S3Settings, read_bytes, redact


def coco_uri(cfg: PretrainConfig, uri: str | None = None) -> str:
    return f"{(uri or cfg.data.uri).rstrip('/')}/{method_config(cfg, DetectConfig).annotations}"


def check_categories(cfg: PretrainConfig, names: list[str], where: str) -> None:
    classes = method_config(cfg, DetectConfig).classes
    if names != classes:
        raise ValueError(f"{redact(where)}: categories {names} differ from method.classes {classes} "
                         "(the detector's labels follow the training set's categories, in id order)")


@register
class Detector(Method):
    name = "detect"
    epoch_spans = False  # COCO-joined rows, split by Ray Train (source_files is None)
    required_columns = frozenset({"image", "boxes", "labels"})
    batch_columns = ("image", "boxes", "labels", "num_boxes")
    export_full = True  # the whole detector is registered beside its encoder
    export_overrides = {"init": "random", "init_weights": None}

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        self.task = method_config(cfg, DetectConfig)
        if self.task.freeze_steps:
            raise ValueError("method.freeze_steps: a frozen-encoder warm-up is not supported for detection; "
                             "use method.layer_decay to slow the encoder down instead")
        self.classes = list(self.task.classes)
        self.detector = build_detector(start_encoder(cfg, self.task), arch=self.task.arch,
                                       num_classes=len(self.classes), image_size=cfg.model.image_size,
                                       mean=cfg.model.mean, std=cfg.model.std, fpn_channels=self.task.fpn_channels,
                                       detections_per_img=self.task.detections_per_img)

    @property
    def backbone(self) -> nn.Module:
        """The encoder, held once, inside the detector (a second reference would save its tensors twice)."""
        body: nn.Module = self.detector.backbone.body  # type: ignore[assignment,union-attr]
        return body

    @classmethod
    def build(cls, cfg: PretrainConfig) -> Detector:
        return cls(cfg)

    @classmethod
    def view_transform(cls, cfg: PretrainConfig) -> BatchFn:
        t = method_config(cfg, DetectConfig)
        return DetectionView(cfg.model.image_size, cfg.data.max_image_pixels, max_boxes=t.max_boxes, train=True,
                             flip_p=t.flip_p)

    @classmethod
    def check_source(cls, cfg: PretrainConfig, s3: S3Settings, listing: Listing | None = None) -> None:
        """The COCO file parses and its categories are the configured classes, before any worker starts. The image
        folder is not listed here (read_coco lists it where it joins images to annotations): no listing to return."""
        uri = coco_uri(cfg)
        _, index = parse_coco(read_bytes(uri, s3), uri)
        check_categories(cfg, [n for _, n in index.categories], uri)

    @classmethod
    def source_files(cls, cfg: PretrainConfig, s3: S3Settings, listing: Listing | None = None) -> list[str] | None:
        return None  # images joined to COCO annotations: Ray Train splits the joined stream

    @classmethod
    def open_source(cls, cfg: PretrainConfig, s3: S3Settings, files: list[str] | None = None,
                    listing: Listing | None = None, *, paths: bool = False, read_tasks: int | None = None,
                    ) -> tuple[ray.data.Dataset, dict[str, int]]:
        t = method_config(cfg, DetectConfig)
        ds, index = read_coco(cfg.data.uri, s3=s3, annotations=t.annotations, limit=cfg.data.limit)
        return ds, index.counts()

    @staticmethod
    def _images(x: torch.Tensor) -> list[torch.Tensor]:
        return list(x.float().div(255.0).unbind(0))  # the detector's own transform normalizes

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        targets = unpad_targets(batch["boxes"], batch["labels"], batch["num_boxes"])
        losses: dict[str, torch.Tensor] = self.detector(self._images(batch["image"]), targets)
        loss = torch.stack(list(losses.values())).sum()
        return {"loss": loss, **{k: v.detach() for k, v in losses.items()}}

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]] | None:
        return layer_decay_groups(self.backbone, self, weight_decay, self.task.layer_decay)

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 32) -> list[dict[str, np.ndarray]]:
        """uint8 images (N, 3, S, S) → per image {boxes (m,4) xyxy, scores (m,), labels (m,) in 1..C}."""
        device = next(self.parameters()).device
        out: list[dict[str, np.ndarray]] = []
        with eval_mode(self):
            for i in range(0, len(images), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(device)
                for det in self.detector(self._images(x)):
                    out.append({k: det[k].cpu().numpy() for k in ("boxes", "scores", "labels")})
        return out

    def encoder(self) -> nn.Module:
        return self.backbone
