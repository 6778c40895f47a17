"""The pipeline's config file (pipelines/retrain.yaml): what to watch, how to train, how to judge."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from raysl.config import format_validation_error, set_dotted
from raysl.config_base import ConfigError, Strict
from raysl.storage import is_s3, redact

STEPS = ("snapshot", "validate", "pretrain", "evaluate", "gate")


class PretrainStep(Strict):
    config: str = Field(description="a pretraining YAML (relative to this file) or a built-in name (byol)")
    overrides: list[str] = Field(default_factory=list, description="dotted overrides, e.g. train.steps=500")


class EvaluationStep(Strict):
    train: str = Field(description="the fixed labeled split the probe fits on (kNN bank / linear classifier)")
    test: str | None = Field(None, description="held-out labeled split scored (default: a seeded 30% of `train`)")
    label_column: str | None = None
    probe: Literal["knn", "linear", "zero_shot"] = Field("knn", description="zero_shot: image-text models (CLIP)")
    k: int = Field(20, gt=0)


class GateStep(Strict):
    margin: float = Field(0.0, description="promote only when candidate > champion + margin (same metric, "
                          "same split); negative admits a small regression")


class PipelineConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", description="names the lock, state and runs")
    data: str = Field(description="the prefix new data lands under (local folder or s3://bucket/prefix)")
    state: str = Field(description="where snapshots, step records and the lock live; same storage as `data`")
    model_name: str = Field(description="the registered model whose @champion this pipeline maintains")
    pretrain: PretrainStep
    evaluation: EvaluationStep
    gate: GateStep = GateStep()
    warm_start: bool = Field(True, description="start from @champion's checkpoint (from scratch when none)")
    validate_samples: int = Field(256, ge=0, description="images decoded from a new snapshot before training; "
                                  "over the pretraining config's data.max_bad_fraction undecodable stops the run")
    tracking_uri: str | None = Field(None, description="unset: $MLFLOW_TRACKING_URI, else ./mlflow.db")
    experiment: str = "raysl-pipelines"
    lock_ttl_s: float = Field(600.0, gt=0, description="a lock whose holder stopped refreshing it this long ago "
                              "is stale and taken over")
    fault_after: Literal["snapshot", "validate", "pretrain", "evaluate", "gate"] | None = Field(
        None, description="chaos testing: the process exits hard right after this step is recorded")

    @field_validator("data", "state")
    @classmethod
    def _strip(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.rstrip("/")

    def check_storage(self) -> None:
        if is_s3(self.data) != is_s3(self.state):
            raise ConfigError(f"state: {self.state!r} and data: {self.data!r} must both be s3:// or both local "
                              "(a snapshot manifest is read with the data's filesystem)")


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> tuple[PipelineConfig, Path]:
    """The config and the folder it came from (relative pretraining configs resolve against it)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"pipeline config {str(path)!r} not found")
    try:
        tree: Any = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {redact(str(exc))}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(tree).__name__}")
    for o in overrides or []:
        set_dotted(tree, o)
    try:
        cfg = PipelineConfig.model_validate(tree)
    except ValidationError as err:
        msg = format_validation_error(err, PipelineConfig)
        raise ConfigError(msg.replace("invalid config", f"invalid pipeline config {p}", 1)) from None
    cfg.check_storage()
    return cfg, p.parent.absolute()
