"""The method contract every pretraining method implements, and the registry that names them.

The loop, CLI and tracking talk to a Method only through this interface; they never branch on a
method's name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import numpy as np
import ray.data
import torch
import torch.nn as nn

from raysl.config import PretrainConfig
from raysl.data.augment import DeviceViews, ViewSpec
from raysl.data.sources import Listing, data_files, list_source, read_images, source_columns
from raysl.storage import S3Settings, redact

FILES_WITHOUT_SPLIT = 4  # a worker's epoch stream of at least this many files is not repartitioned
BatchFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class Method(nn.Module, ABC):
    """One self-supervised method: a module whose forward returns at least {"loss": …}."""

    name: ClassVar[str]
    # open_source can tag rows with their file (`paths`), so several epochs can share one execution
    epoch_spans: ClassVar[bool] = True
    #: columns the source must offer (checked before any worker starts)
    required_columns: ClassVar[frozenset[str]] = frozenset({"image"})
    #: columns the view transform yields that the training loop feeds to forward()
    batch_columns: ClassVar[tuple[str, ...]]
    #: timm arguments the method's encoder needs unless the config says otherwise
    encoder_defaults: ClassVar[dict[str, Any]] = {}
    #: also register the whole trained module (not just `encoder()`), e.g. CLIP's text tower for zero-shot
    export_full: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def build(cls, cfg: PretrainConfig) -> Method:
        """Create the module from a validated config."""

    @classmethod
    @abstractmethod
    def view_transform(cls, cfg: PretrainConfig) -> BatchFn:
        """The CPU batch transform Ray Data runs before the batch reaches a training worker."""

    @classmethod
    def check_config(cls, cfg: PretrainConfig) -> None:
        """Fail before anything starts on settings this method cannot honour."""
        if cfg.data.augment_on == "gpu" and not cls.augments_on_device:
            raise ValueError(f"data.augment_on: 'gpu' is not supported by method {cfg.method.name!r} (its views are "
                             "made on the CPU only); allowed: 'cpu'")

    @classmethod
    def check_source(cls, cfg: PretrainConfig, s3: S3Settings, listing: Listing | None = None) -> Listing | None:
        """Fail before any worker starts if the data cannot feed this method (default: its required columns).

        Returns the data URI's listing (`listing` if the caller has one, else made here) for `source_files` and
        `open_source` to reuse, so a run lists its data once; None where the source is not a listed corpus."""
        d = cfg.data
        listing = listing if listing is not None else list_source(d.uri, d.format, s3)
        missing = cls.required_columns - source_columns(listing, d.format, s3, d.caption_column, d.label_column)
        if missing:
            raise ValueError(f"data {redact(d.uri)!r} lacks column(s) {sorted(missing)} "
                             f"that method {cfg.method.name!r} needs")
        return listing

    @classmethod
    def source_files(cls, cfg: PretrainConfig, s3: S3Settings, listing: Listing | None = None) -> list[str] | None:
        """The corpus as a list of files, read once by the driver; each worker then reads its own part of a
        seeded per-epoch order and can resume mid-epoch (raysl.train.stream). None: this method's source is not
        a plain file list, and Ray Train splits the stream `open_source` builds. `listing`: what `check_source`
        returned, used instead of listing the URI again."""
        return data_files(listing if listing is not None else cfg.data.uri, cfg.data.format, s3)

    @classmethod
    def open_source(cls, cfg: PretrainConfig, s3: S3Settings, files: list[str] | None = None,
                    listing: Listing | None = None, *, paths: bool = False, read_tasks: int | None = None,
                    ) -> tuple[ray.data.Dataset, dict[str, int]]:
        """The training stream before the view transform, and data-quality counts for MLflow (e.g. skipped
        boxes). Default: images (with captions or labels where the method requires them). `files` set: exactly
        those, in that order (a worker's part of an epoch, or of several: raysl.train.span); unset: every file, in a
        seeded order. `listing`: what `check_source` returned, used instead of listing the URI again. `paths`,
        `read_tasks`: as `read_images` takes them (only where `epoch_spans`)."""
        d = cfg.data
        captions = d.caption_column if "caption" in cls.required_columns else None
        labels = "label" in cls.required_columns
        # A worker's own stream of several files needs no repartition: read, decode and views fuse into one task
        # per file, and the files spread over the CPUs (measured 20–30% faster than splitting each file's block
        # into 64-row blocks first). A stream of one or a few files is split, or it would decode on one CPU.
        split = None if files is not None and (len(files) >= FILES_WITHOUT_SPLIT or read_tasks) else 64
        ds = read_images(listing if listing is not None else d.uri, fmt=d.format, s3=s3,
                         image_column=d.image_column, limit=d.limit, shuffle_files=files is None, files=files,
                         caption_column=captions, with_labels=labels, rows_per_block=split,
                         label_column=d.label_column if labels else None, shuffle_seed=cfg.train.seed,
                         paths=paths, read_tasks=read_tasks)
        return ds, {}

    @abstractmethod
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss and metrics for one batch; runs inside DDP so DDP sees the whole computation."""

    def forward_backward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One step's forward and backward. `model` is this method wrapped for data parallelism (DDP),
        which averages the gradients; a method that computes its gradients another way (CLIP's feature
        caching) overrides this and averages them itself."""
        out: dict[str, torch.Tensor] = model(batch)
        out["loss"].backward()
        return out

    def on_step_end(self, step: int, total_steps: int) -> dict[str, float]:
        """Called after optimizer.step() (step = updates done so far); returns metrics to log."""
        return {}

    @abstractmethod
    def encoder(self) -> nn.Module:
        """The network that is registered in MLflow and used downstream."""

    def online_metrics(self, data: dict[str, Any]) -> dict[str, float]:
        """Method-specific held-out metrics (beyond the shared kNN) on the online-eval split: uint8
        `image`, int `label`, `classes`, and `caption` where the split has captions."""
        return {}

    @classmethod
    def default_model_name(cls) -> str:
        """The registered model's name unless tracking.register_as says otherwise."""
        return f"raysl-{cls.name}-encoder"

    def collate(self, batch: dict[str, torch.Tensor], step: int, rank: int) -> dict[str, torch.Tensor]:
        """Worker-side additions to a batch (I-JEPA masks); identity by default. `step` is the step about to run."""
        return batch

    #: whether `data.augment_on: gpu` is supported: the method's views are CropViews with `device_views` set
    augments_on_device: ClassVar[bool] = False
    #: the views this method makes on its device when `data.augment_on: gpu` (set by `device_views_for`)
    device_views: DeviceViews | None = None

    def device_augment(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Augmentations applied on the training worker's device after the batch is moved there
        (`data.augment_on: gpu`); identity when Ray Data's CPU workers already augmented it."""
        return batch if self.device_views is None else self.device_views(batch)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]] | None:
        """Optimizer parameter groups (a group may carry `lr_scale`, which timm's schedulers honour), or None
        for the default: every trainable parameter, biases and norms without weight decay."""
        return None

    def ddp_kwargs(self) -> dict[str, Any]:
        """Extra DistributedDataParallel arguments: a method whose steps leave some parameters without a
        gradient (a frozen encoder during a warm-up) asks for find_unused_parameters."""
        return {}

    #: method-section values the exported config takes instead of the run's: it rebuilds the architecture,
    #: whose weights are the saved ones, so files the run read at build time (initial weights) are not wanted
    export_overrides: ClassVar[dict[str, Any]] = {}


def device_views_for(cfg: PretrainConfig, specs: dict[str, ViewSpec]) -> DeviceViews | None:
    """The device-side views for `data.augment_on: gpu` (None on cpu): the same specs the CPU transform uses."""
    return DeviceViews(specs) if cfg.data.augment_on == "gpu" else None


M = TypeVar("M", bound=type[Method])
C = TypeVar("C")


def method_config(cfg: PretrainConfig, kind: type[C]) -> C:
    """The method section of `cfg`, checked to be of the kind a method class expects."""
    if not isinstance(cfg.method, kind):
        raise ValueError(f"method.name {cfg.method.name!r} does not configure {kind.__name__}")
    return cfg.method
_REGISTRY: dict[str, type[Method]] = {}


def register(cls: M) -> M:
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"method.name: {name!r} is not a method; allowed: {registered()}") from None


def backbone_kwargs(cfg: PretrainConfig) -> dict[str, Any]:
    """Extra timm arguments for the encoder: the method's defaults, then the config's."""
    return {**get_method(cfg.method.name).encoder_defaults, **cfg.model.backbone_kwargs}


def describe_encoder(cfg: PretrainConfig) -> dict[str, Any]:
    """What a downstream job needs to rebuild and feed the encoder: architecture and preprocessing."""
    return {
        "method": cfg.method.name,
        "backbone": cfg.model.backbone,
        "cifar_stem": cfg.model.cifar_stem,
        "image_size": cfg.model.image_size,
        "patch_size": cfg.model.patch_size,
        "backbone_kwargs": backbone_kwargs(cfg),
        "mean": list(cfg.model.mean),
        "std": list(cfg.model.std),
    }


def export_config(cfg: PretrainConfig) -> dict[str, Any]:
    """The config that rebuilds the whole method downstream; where the data lived is not part of it."""
    tree = cfg.model_dump(mode="json", include={"method", "model", "data"})
    tree["data"] = {"uri": "exported"}
    tree["method"].update(get_method(cfg.method.name).export_overrides)
    return tree
