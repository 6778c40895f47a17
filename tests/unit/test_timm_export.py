"""The exported encoder loads with plain timm (no raysl), by the README's three lines, and gives the same
features; a CIFAR-stem ResNet needs the stem swapped first, as its config says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

from raysl.models.backbones import create_backbone
from raysl.models.files import save_encoder_dir

SPECS = [
    {"backbone": "resnet18", "cifar_stem": False, "image_size": 32, "backbone_kwargs": {}},
    {"backbone": "vit_tiny_patch16_224", "cifar_stem": False, "image_size": 32, "patch_size": 4,
     "backbone_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 3}},
]


def _export(tmp_path: Path, spec: dict) -> tuple[nn.Module, Path]:
    spec = {**spec, "mean": [0.5] * 3, "std": [0.5] * 3}
    torch.manual_seed(0)
    enc = create_backbone(spec["backbone"], cifar_stem=spec["cifar_stem"], image_size=spec["image_size"],
                          patch_size=spec.get("patch_size"), **spec["backbone_kwargs"]).eval()
    save_encoder_dir(tmp_path, enc, spec)
    return enc, tmp_path


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["backbone"])
def test_plain_timm_loads_the_exported_encoder(tmp_path: Path, spec: dict) -> None:
    enc, folder = _export(tmp_path, spec)
    # The README's three lines:
    cfg = json.loads((folder / "timm_config.json").read_text())
    model = timm.create_model(cfg["architecture"], pretrained=True,
                              pretrained_cfg_overlay={"file": str(folder / "encoder.safetensors"),
                                                      **cfg["pretrained_cfg"]}, **cfg["model_args"]).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), enc(x))
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) or list(model.pretrained_cfg["mean"]) == [0.5] * 3


def test_cifar_stem_is_flagged_and_loads_after_the_swap(tmp_path: Path) -> None:
    enc, folder = _export(tmp_path, {**SPECS[0], "cifar_stem": True})
    cfg = json.loads((folder / "timm_config.json").read_text())
    assert cfg["cifar_stem"] is True
    from safetensors.torch import load_file

    model = timm.create_model(cfg["architecture"], **cfg["model_args"])
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    model.load_state_dict(load_file(str(folder / "encoder.safetensors")))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), enc(x))
