"""Specs from the registry or a checkpoint: only plain timm names and allow-listed arguments reach timm, and a spec
that asks for remote or pickled weights is refused, with the field named, before anything is built."""

import json
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

from raysl.models import backbones
from raysl.models.files import load_encoder_dir, save_encoder_dir
from raysl.models.spec import (
    ALLOWED_KWARGS,
    check_backbone_kwargs,
    check_backbone_name,
    check_encoder_spec,
    check_model_tree,
)

SPEC: dict[str, Any] = {"method": "byol", "backbone": "resnet10t", "cifar_stem": False, "image_size": 32,
                        "patch_size": None, "backbone_kwargs": {}, "mean": [0.5] * 3, "std": [0.25] * 3,
                        "source_run": "abc", "team": "vision"}


@pytest.fixture
def no_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything reaches timm.create_model."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"timm.create_model was called with {args} {kwargs}")

    monkeypatch.setattr(backbones.timm, "create_model", refuse)


def test_valid_specs_pass_unchanged() -> None:
    assert check_encoder_spec(dict(SPEC)) == SPEC  # metadata keys pass through
    vit = {**SPEC, "backbone": "vit_tiny_patch16_224", "cifar_stem": False, "patch_size": 4,
           "backbone_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 3, "global_pool": "avg", "fc_norm": False,
                               "class_token": True, "drop_path_rate": 0.1, "init_values": None}}
    assert check_encoder_spec(vit) is vit
    assert check_backbone_kwargs({"depths": [1, 1, 2, 1], "mlp_ratio": 4.0}) == {"depths": [1, 1, 2, 1],
                                                                                 "mlp_ratio": 4.0}


@pytest.mark.parametrize("name", ["hf-hub:timm/resnet18.a1_in1k", "hf_hub:timm/resnet18", "local-dir:/tmp/model",
                                  "timm/resnet18.a1_in1k", "resnet18.a1_in1k", "../resnet18", "RESNET18"])
def test_hub_and_local_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match=r"backbone: .* not a plain timm model name.*timm\.list_models"):
        check_backbone_name(name)


def test_unknown_and_non_string_names_are_refused() -> None:
    with pytest.raises(ValueError, match="'resnet_does_not_exist' is not a timm model"):
        check_backbone_name("resnet_does_not_exist")
    with pytest.raises(ValueError, match="expected a timm model name"):
        check_backbone_name(["resnet18"])


@pytest.mark.parametrize(("key", "value"), [
    ("pretrained", True), ("pretrained_cfg", {"url": "https://evil.example/w.pth"}),
    ("pretrained_cfg_overlay", {"url": "https://evil.example/w.pth"}), ("checkpoint_path", "/tmp/evil.pth"),
    ("pretrained_strict", False), ("cache_dir", "/tmp"), ("num_classes", 1000), ("img_size", 224),
])
def test_weight_fetching_arguments_are_refused(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"backbone_kwargs\.{key}: refused .*Allowed: \["):
        check_encoder_spec({**SPEC, "backbone_kwargs": {key: value}})


def test_arguments_outside_the_allow_list_are_refused() -> None:
    with pytest.raises(ValueError, match=r"backbone_kwargs\.act_layer: not an allowed timm argument; allowed: "):
        check_backbone_kwargs({"act_layer": "gelu"})
    assert "pretrained" not in ALLOWED_KWARGS and "checkpoint_path" not in ALLOWED_KWARGS


@pytest.mark.parametrize(("value", "message"), [
    ({"url": "x"}, "dict is not allowed"), ([1] * 17, "at most 16"), ([1, "a"], r"\[1\]: expected a number"),
    (float("nan"), "out of range"), (float("inf"), "out of range"), (10**9, "out of range"),
    ("https://evil.example/x", "short names"), ("a" * 40, "short names"),
])
def test_values_are_json_scalars_or_short_number_lists(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=rf"backbone_kwargs\.depth.*{message}"):
        check_backbone_kwargs({"depth": value})


@pytest.mark.parametrize(("field", "value", "message"), [
    ("image_size", "32", "image_size: expected an integer"), ("image_size", True, "image_size: expected an integer"),
    ("patch_size", 0, "patch_size: expected an integer"), ("cifar_stem", "yes", "cifar_stem: expected true or false"),
    ("mean", [0.5, 0.5], "mean: expected 3 numbers"), ("std", [0.5, "x", 0.5], r"std\[1\]: expected a number"),
    ("backbone_kwargs", ["pretrained"], "backbone_kwargs: expected a mapping"),
])
def test_malformed_fields_are_named(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_encoder_spec({**SPEC, field: value})


def test_create_backbone_never_asks_timm_for_pretrained_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    real = timm.create_model

    def spy(name: str, **kwargs: Any) -> torch.nn.Module:
        calls.append(kwargs)
        return real(name, **kwargs)

    monkeypatch.setattr(backbones.timm, "create_model", spy)
    backbones.create_backbone("resnet10t", image_size=32, drop_rate=0.0)
    assert calls and calls[0]["pretrained"] is False and list(calls[0])[-1] == "pretrained"
    with pytest.raises(ValueError, match=r"model\.backbone_kwargs\.pretrained: refused"):
        backbones.create_backbone("resnet10t", image_size=32, pretrained=True)
    with pytest.raises(ValueError, match=r"model\.backbone: 'hf-hub:timm/resnet18.a1_in1k' is not a plain"):
        backbones.create_backbone("hf-hub:timm/resnet18.a1_in1k")
    assert len(calls) == 1  # the refused calls never reached timm


def test_encoder_dir_round_trips(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cifar_stem: only ResNet-style backbones with a one-conv stem"):
        backbones.create_backbone("resnet10t", cifar_stem=True)  # a deep stem: a clear error, not an AttributeError
    torch.manual_seed(0)
    enc = backbones.create_backbone("resnet10t", image_size=32).eval()
    save_encoder_dir(tmp_path, enc, SPEC)
    loaded, spec = load_encoder_dir(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), enc(x))
    assert spec == SPEC


@pytest.mark.parametrize(("change", "field"), [
    ({"backbone": "hf-hub:timm/resnet18.a1_in1k"}, "encoder.json: backbone"),
    ({"backbone_kwargs": {"pretrained": True, "pretrained_cfg_overlay": {"url": "https://evil.example/w"}}},
     r"encoder.json: backbone_kwargs\.pretrained"),
    ({"backbone_kwargs": {"checkpoint_path": "/tmp/evil.pth"}}, r"backbone_kwargs\.checkpoint_path"),
])
def test_tampered_encoder_dir_is_refused_before_timm(tmp_path: Path, no_timm: None, change: dict[str, Any],
                                                     field: str) -> None:
    (tmp_path / "encoder.json").write_text(json.dumps({**SPEC, **change}))
    with pytest.raises(ValueError, match=field):
        load_encoder_dir(tmp_path)


def _tree(**method: Any) -> dict[str, Any]:
    return {"method": {"name": "classify", "classes": ["a", "b"], **method},
            "model": {"backbone": "resnet10t", "cifar_stem": False, "image_size": 32, "patch_size": None,
                      "backbone_kwargs": {}, "mean": [0.5] * 3, "std": [0.5] * 3},
            "data": {"uri": "exported"}}


def test_model_tree_sections_and_backbone_are_checked() -> None:
    assert check_model_tree(_tree()) == _tree()
    with pytest.raises(ValueError, match=r"model.json: sections \['train'\] are not allowed"):
        check_model_tree({**_tree(), "train": {"storage_path": "s3://evil"}})
    bad = _tree()
    bad["model"]["backbone_kwargs"] = {"pretrained_cfg_overlay": {"url": "https://evil.example/w"}}
    with pytest.raises(ValueError, match=r"model.json: model\.backbone_kwargs\.pretrained_cfg_overlay: refused"):
        check_model_tree(bad)


@pytest.mark.parametrize("method", [{"init": "pretrained", "init_weights": "s3://evil/w.safetensors"},
                                    {"subset_uri": "s3://evil/keys.json"}])
def test_whole_model_cannot_name_files_to_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               method: dict[str, Any]) -> None:
    from raysl.methods import downstream, export

    def refuse(*args: Any, **kwargs: Any) -> bytes:
        raise AssertionError(f"read {args}")

    monkeypatch.setattr(downstream, "read_bytes", refuse)
    (tmp_path / "model.json").write_text(json.dumps(_tree(**method)))
    with pytest.raises(ValueError, match=r"model.json: method\.(init|subset_uri): .* is not allowed in a registered"):
        export.load_full_dir(tmp_path)
