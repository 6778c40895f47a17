"""Rebuild a whole method registered beside its encoder (CLIP's two towers, a fine-tuned classifier or
detector) from its safetensors weights and the config that built it. Tracking downloads the files; this
layer knows the methods, so rebuilding lives here."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch.nn as nn
from safetensors.torch import load_file

from raysl.config import PretrainConfig
from raysl.methods.base import get_method
from raysl.models.files import FULL_CONFIG, FULL_WEIGHTS
from raysl.tracking import download_full_dir


def load_full_dir(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a method exported by `models.files.save_full_dir` → (module in eval mode, its config tree)."""
    tree = json.loads((folder / FULL_CONFIG).read_text())
    cfg = PretrainConfig.model_validate(tree)
    model = get_method(cfg.method.name).build(cfg)
    model.load_state_dict(load_file(str(folder / FULL_WEIGHTS)))
    model.eval()
    return model, tree


def load_full_model(model_uri: str, uri: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load the whole method registered with an encoder (CLIP: both towers) → (module, config tree)."""
    with tempfile.TemporaryDirectory() as tmp:
        return load_full_dir(download_full_dir(model_uri, uri, tmp))
