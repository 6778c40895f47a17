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
from raysl.models.spec import check_model_tree
from raysl.tracking import download_full_dir


def load_full_dir(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a method exported by `models.files.save_full_dir` → (module in eval mode, its config tree).

    The tree comes from the registry: its sections and backbone are checked (`raysl.models.spec`), and the fields
    export pins (`export_overrides`: no initial weights, no subset file to read) must hold their exported values,
    so building the method reads nothing but the registered files."""
    tree = check_model_tree(json.loads((folder / FULL_CONFIG).read_text()), FULL_CONFIG)
    method = tree.get("method")
    if not isinstance(method, dict):
        raise ValueError(f"{FULL_CONFIG}: method: expected a JSON object, got {method!r}")
    pinned = get_method(str(method.get("name"))).export_overrides
    for key, value in pinned.items():
        if key in method and method[key] != value:
            raise ValueError(f"{FULL_CONFIG}: method.{key}: {method[key]!r} is not allowed in a registered model; "
                             f"allowed: {value!r} (what export writes)")
    cfg = PretrainConfig.model_validate(tree)
    model = get_method(cfg.method.name).build(cfg)
    model.load_state_dict(load_file(str(folder / FULL_WEIGHTS)))
    model.eval()
    return model, tree


def load_full_model(model_uri: str, uri: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load the whole method registered with an encoder (CLIP: both towers) → (module, config tree)."""
    with tempfile.TemporaryDirectory() as tmp:
        return load_full_dir(download_full_dir(model_uri, uri, tmp))
