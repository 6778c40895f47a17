"""Run configuration: pydantic models (unknown keys rejected), YAML files and dotted overrides.

A config error names the field and, where the field is closed, the values it allows.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from raysl.config_base import ConfigError, Strict
from raysl.config_ssl import DINOConfig, DoRAConfig
from raysl.config_tasks import ClassifyConfig, DetectConfig

MAX_IMAGE_PIXELS = 40_000_000  # decompression-bomb guard shared by training, probing, embedding and sharding
_SECRET_KEY = re.compile(r"(secret|password|token|credential|access_key|session_key)", re.IGNORECASE)


class DataConfig(Strict):
    uri: str = Field(description="Image folder, WebDataset shards, Parquet or video files; local path or "
                               "s3://bucket/prefix")
    format: Literal["auto", "images", "webdataset", "parquet", "video"] = "auto"
    image_column: str = "image"
    label_column: str | None = None
    caption_column: str = Field("caption", description="image-text data: the Parquet column or the "
                                                       "WebDataset JSON field holding the caption")
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0)
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, gt=0, description="decompression-bomb guard")
    shuffle_buffer: int = Field(2048, ge=0, description="rows in each worker's local shuffle buffer")
    limit: int | None = Field(None, gt=0, description="read at most this many samples")
    deterministic: bool = Field(False, description="sources Ray Train splits (COCO, a held subset): keep Ray "
                                "Data's row order (seeded file shuffle + preserve_order), so two runs see the same "
                                "data order, at some cost in throughput; file-list sources always keep it")
    augment_on: Literal["cpu", "gpu"] = Field("cpu", description="where the method's augmentations run: cpu (Ray "
                                              "Data CPU workers) or gpu (Ray Data only decodes to uint8 at a "
                                              "bounded size; the training worker augments the batch on its device)")
    frames_per_clip: int = Field(8, ge=1, description="video: frames in a clip (DoRA: 8)")
    frame_stride: int = Field(60, ge=1, description="video: frames between a clip's frames (DoRA: 60, 1 s at 60 fps)")
    clip_every: int | None = Field(None, ge=1, description="video: frames between clip starts; unset: frame_stride")
    frame_side: int | None = Field(None, ge=8, description="video: frames are decoded with this short side (long "
                                   "videos are 4K); unset: 2 × model.image_size")
    gpu_decode_size: int | None = Field(None, ge=8, description="augment_on=gpu: the side each image is resized to "
                                        "(whole) before it is sent to the device; default 2 × model.image_size")

    @field_validator("uri")
    @classmethod
    def _required(cls, v: str) -> str:
        if v.strip() in ("", "???"):
            raise ValueError("required: set data.uri to an image folder, shards or Parquet (local or s3://)")
        return v


class S3Config(Strict):
    """Where S3 lives. Keys come only from the usual AWS environment variables, never from config."""

    endpoint_url: str | None = None
    region: str | None = None


class ModelConfig(Strict):
    backbone: str = "resnet18"
    cifar_stem: bool = Field(False, description="3x3 stride-1 stem, no max-pool (ResNets on 32 px images)")
    image_size: int = Field(32, ge=8)
    patch_size: int | None = Field(None, ge=1, description="ViTs: patch size (timm's default if unset)")
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model args")
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


class BYOLViewConfig(Strict):
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: tuple[float, float] = (1.0, 0.1)
    solarize_p: tuple[float, float] = (0.0, 0.2)


class BYOLConfig(Strict):
    name: Literal["byol"] = "byol"
    projector_hidden: int = Field(4096, gt=0)
    projector_dim: int = Field(256, gt=0)
    predictor_hidden: int = Field(4096, gt=0)
    tau_base: float = Field(0.996, ge=0.0, le=1.0)
    views: BYOLViewConfig = BYOLViewConfig()


class IJEPAConfig(Strict):
    name: Literal["ijepa"] = "ijepa"
    predictor_depth: int = Field(6, ge=1)
    predictor_width: int = Field(384, ge=8)
    predictor_heads: int = Field(6, ge=1)
    num_targets: int = Field(4, ge=1)
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    min_keep: int = Field(4, ge=1)
    momentum: tuple[float, float] = Field((0.996, 1.0), description="EMA momentum, linear from first to second")
    loss: Literal["l2", "smooth_l1"] = "l2"
    crop_scale: tuple[float, float] = (0.3, 1.0)
    flip_p: float = 0.5
    sincos_positions: bool = Field(True, description="fixed 2-D sin-cos patch positions in the encoders "
                                                     "(the reference implementation), not a learned table")
    export_encoder: Literal["target", "context"] = Field(
        "target", description="the encoder registered and probed: the EMA target (the paper's) or the context "
                              "encoder, which leads the target in short runs")


class CLIPConfig(Strict):
    name: Literal["clip"] = "clip"
    embed_dim: int = Field(512, gt=0, description="shared image-text space")
    context_length: int = Field(77, ge=4, description="caption length in BPE tokens, start/end included")
    text_width: int = Field(512, ge=8)
    text_heads: int = Field(8, ge=1)
    text_layers: int = Field(12, ge=1)
    loss: Literal["softmax", "sigmoid"] = Field("softmax", description="CLIP's InfoNCE or SigLIP's sigmoid")
    init_temperature: float = Field(0.07, gt=0, description="logit scale starts at 1/this")
    max_logit_scale: float = Field(100.0, gt=1, description="the logit scale is clamped here")
    init_bias: float = Field(-10.0, description="sigmoid loss: initial logit bias (SigLIP)")
    loss_chunk: int | None = Field(1024, ge=1, description="score this many rows at a time, recomputing them "
                                   "in backward: loss memory grows linearly with the global batch")
    micro_batches: int = Field(1, ge=1, description="GradCache: split each worker's batch into this many "
                                                   "chunks; the loss still sees the whole global batch")
    crop_scale: tuple[float, float] = (0.9, 1.0)
    flip_p: float = 0.0


MethodConfig = Annotated[Union[BYOLConfig, IJEPAConfig, CLIPConfig, DINOConfig, DoRAConfig,  # noqa: UP007
                               ClassifyConfig, DetectConfig],
                         Field(discriminator="name")]


class OptimConfig(Strict):
    name: Literal["lars", "adamw", "sgd"] = "lars"
    lr: float = Field(0.2, gt=0, description="base LR for a batch of 256 when scale_lr is set")
    scale_lr: bool = True
    weight_decay: float = Field(1.5e-6, ge=0)
    momentum: float = 0.9
    warmup_steps: int = Field(10, ge=0)
    min_lr: float = Field(0.0, ge=0)
    weight_decay_end: float | None = Field(None, ge=0, description="cosine weight-decay schedule to this value")
    clip_grad_norm: float | None = Field(None, gt=0, description="clip the global gradient norm to this value")


class TrainConfig(Strict):
    steps: int = Field(100, gt=0)
    batch_size: int = Field(64, gt=1, description="global batch, split evenly across workers")
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0, description="leave CPU for Ray Data's decode tasks")
    amp: bool = Field(True, description="bf16 autocast on GPU (ignored on CPU)")
    sync_batchnorm: bool = True
    max_bad_steps: int = Field(5, ge=1, description="consecutive NaN/inf losses before the run stops")
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=0, description="worker failures to recover from the last checkpoint")
    seed: int = 0
    storage_path: str = Field("./raysl-runs", description="checkpoints: local folder or s3://bucket/prefix")
    run_name: str | None = None
    init_from: str | None = Field(None, description="warm start: a checkpoint folder (local or s3://) whose model "
                                  "weights start this run; optimizer and schedule start fresh")
    torch_threads: int | None = Field(None, ge=1)
    placement_timeout_s: float = Field(120.0, gt=0, description="how long to wait for the cluster to fit the "
                                       "workers before failing with the resources asked and available")
    lock_wait_s: float = Field(0.0, ge=0, description="a second run of this config waits this long for the first "
                                "to finish, then refuses")
    lock_ttl_s: float = Field(120.0, gt=0, description="a run lock whose holder stopped refreshing it is stale after "
                               "this many seconds")
    nan_at_steps: list[int] = Field(default_factory=list, description="chaos testing: make the batch NaN at these "
                                    "steps (the step must be skipped and the model left as it was)")


class TrackingConfig(Strict):
    tracking_uri: str | None = Field(None, description="unset: $MLFLOW_TRACKING_URI, else ./mlflow.db")
    experiment: str = "raysl"
    register_as: str | None = Field(None, description="registered model name; default raysl-<method>-encoder")
    alias: str = "candidate"
    retry_s: float = Field(60.0, ge=0, description="how long registration (and marking a failed run) retries "
                           "while MLflow does not answer")
    tags: dict[str, str] = Field(default_factory=dict, description="extra tags on the run and the registered "
                                 "version (downstream jobs record their source encoder here: lineage)")


class OnlineEvalConfig(Strict):
    """A small labeled split for a kNN top-1 while training runs."""

    uri: str | None = None
    label_column: str | None = None
    every: int = Field(50, ge=1)
    max_samples: int = Field(2000, gt=0)
    k: int = Field(20, gt=0)


class PretrainConfig(Strict):
    method: MethodConfig = BYOLConfig()
    data: DataConfig
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: OnlineEvalConfig = OnlineEvalConfig()
    s3: S3Config = S3Config()

    @model_validator(mode="before")
    @classmethod
    def _default_method(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("method"), dict) and "name" not in data["method"]:
            data = {**data, "method": {"name": "byol", **data["method"]}}
        return data


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Walk a pydantic model along an error location to the model that owns its last part."""
    current: Any = model
    parts = list(loc[:-1])
    while parts:
        part = parts.pop(0)
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        members = [a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        if members and parts:  # a tagged union: pydantic puts the tag in the location
            tag = parts.pop(0)
            ann = next((m for m in members if m.model_fields["name"].default == tag), None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        current = ann
    return current if isinstance(current, type) else None


def format_validation_error(err: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            owner = _model_at(model, loc)
            allowed = ", ".join(sorted(owner.model_fields)) if owner else "?"
            lines.append(f"{where}: unknown field; allowed fields here: {allowed}")
        else:
            lines.append(f"{where}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def set_dotted(tree: dict[str, Any], dotted: str) -> None:
    """Apply `a.b.c=value` to a nested dict; the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r} is not of the form key.path=value")
    key, raw = dotted.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {p!r} is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw)


def builtin_config_path(name: str) -> Path | None:
    p = Path(__file__).parent / "configs" / f"{name}.yaml"
    return p if p.exists() else None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PretrainConfig:
    """Load YAML (a path, or the name of a built-in config such as `byol`) and apply overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            builtin = builtin_config_path(str(path))
            if builtin is None:
                raise ConfigError(f"config file {str(path)!r} not found (built-in configs: byol, byol-cifar)")
            p = builtin
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(loaded).__name__}")
        tree = loaded
    for o in overrides or []:
        set_dotted(tree, o)
    return parse_config(tree)


def parse_config(tree: dict[str, Any]) -> PretrainConfig:
    try:
        return PretrainConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, PretrainConfig)) from None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten for MLflow params; anything that looks like a secret is dropped, not logged."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if _SECRET_KEY.search(k):
            continue
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
