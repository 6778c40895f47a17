"""The folder an encoder travels in — checkpoints, the registry, plain-timm users: its weights as safetensors
(timm's own key names; nothing is unpickled on load), the spec that rebuilds and feeds it (`encoder.json`), a
timm config; and, for methods registered whole (CLIP's towers, a fine-tuned classifier or detector), the whole
module's weights and the config that rebuilds it. Specs read back are checked against an allow-list (models/spec.py)
before anything is built."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.nn as nn
from safetensors.torch import load_file, save_file

from raysl.models.backbones import create_backbone, timm_config
from raysl.models.spec import check_encoder_spec

FULL_WEIGHTS, FULL_CONFIG, TIMM_CONFIG = "model.safetensors", "model.json", "timm_config.json"


def save_encoder_dir(folder: Path, encoder: nn.Module, spec: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _save_weights(encoder, folder / "encoder.safetensors")
    (folder / "encoder.json").write_text(json.dumps(spec, indent=2))
    # timm's own key names are what the encoder already has; this lets plain timm rebuild it (README)
    (folder / TIMM_CONFIG).write_text(json.dumps(timm_config(spec), indent=2))


def _save_weights(module: nn.Module, path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(path))


def save_full_dir(folder: Path, model: nn.Module, config: dict[str, Any]) -> None:
    """The whole trained method (e.g. CLIP's two towers), beside the encoder: weights + rebuilding config."""
    folder.mkdir(parents=True, exist_ok=True)
    _save_weights(model, folder / FULL_WEIGHTS)
    (folder / FULL_CONFIG).write_text(json.dumps(config, indent=2))


def load_encoder_dir(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild an encoder from its folder: the architecture from the spec, then the safetensors weights. The spec
    comes from a registry or a checkpoint, so it is checked (`raysl.models.spec`) before timm sees any of it."""
    spec = check_encoder_spec(json.loads((folder / "encoder.json").read_text()))
    model = create_backbone(spec["backbone"], cifar_stem=spec.get("cifar_stem", False), image_size=spec["image_size"],
                            patch_size=spec.get("patch_size"), **spec.get("backbone_kwargs", {}))
    model.load_state_dict(load_file(str(folder / "encoder.safetensors")))
    model.eval()
    return model, spec
