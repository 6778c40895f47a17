"""Classification fine-tuning as a Method: where gradients go (frozen warm-up vs full), layer-wise LR decay,
pretrained vs random init from the same seed, the labeled subset and label mapping of the view, the
stratified label fraction and the test-label check."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as save_safetensors

from raysl.config import parse_config
from raysl.data.views import keep_keys
from raysl.eval.finetune import check_test_labels, stratified_subset
from raysl.methods import get_method
from raysl.methods.base import export_config
from raysl.methods.classify import Classifier
from raysl.models.backbones import create_backbone
from raysl.train.optim import build_optimizer, build_scheduler


def _cfg(tmp_path: Path, **method: object):
    return parse_config({
        "data": {"uri": "/x"}, "model": {"backbone": "resnet18", "image_size": 32},
        "method": {"name": "classify", "classes": ["a", "b", "c"], "init": "random", **method},
        "optim": {"name": "adamw", "lr": 1e-3, "scale_lr": False},
    })


def _weights(tmp_path: Path, seed: int = 7) -> tuple[str, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    state = create_backbone("resnet18", image_size=32).state_dict()
    path = tmp_path / "enc.safetensors"
    path.write_bytes(save_safetensors({k: v.contiguous() for k, v in state.items()}))
    return str(path), state


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
            "label": torch.tensor([0, 1, 2, 0][:n])}


def test_pretrained_init_loads_the_encoder_and_draws_the_same_head(tmp_path: Path) -> None:
    uri, state = _weights(tmp_path)
    torch.manual_seed(0)
    pre = Classifier(_cfg(tmp_path, init="pretrained", init_weights=uri))
    torch.manual_seed(0)
    rnd = Classifier(_cfg(tmp_path))
    for k, v in state.items():
        torch.testing.assert_close(pre.backbone.state_dict()[k], v)
    assert not torch.equal(rnd.backbone.conv1.weight, pre.backbone.conv1.weight)
    torch.testing.assert_close(pre.head.weight, rnd.head.weight)  # same seed → same head in both runs


def test_pretrained_without_weights_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="init_weights"):
        Classifier(_cfg(tmp_path, init="pretrained"))


def test_frozen_warmup_sends_gradients_only_to_the_head(tmp_path: Path) -> None:
    m = Classifier(_cfg(tmp_path, freeze_steps=2))
    running = m.backbone.bn1.running_mean.clone()
    for step, frozen in ((1, True), (2, True), (3, False)):
        m.zero_grad(set_to_none=True)
        m.forward_backward(m, m.collate(_batch(), step, 0))
        assert m.head.weight.grad is not None and m.head.weight.grad.abs().sum() > 0
        backbone_grads = [p.grad for p in m.backbone.parameters()]
        if frozen:
            assert all(g is None for g in backbone_grads), step
            torch.testing.assert_close(m.backbone.bn1.running_mean, running)  # eval mode: BN stats untouched
        else:
            assert all(g is not None for g in backbone_grads)
            assert not torch.equal(m.backbone.bn1.running_mean, running)
    assert m.ddp_kwargs() == {"find_unused_parameters": True}
    assert Classifier(_cfg(tmp_path)).ddp_kwargs() == {}


def test_layer_decay_scales_lr_from_the_head_down(tmp_path: Path) -> None:
    m = Classifier(_cfg(tmp_path, layer_decay=0.5))
    cfg = _cfg(tmp_path, layer_decay=0.5)
    opt = build_optimizer(m, cfg.optim, 64)
    sched = build_scheduler(opt, cfg.optim, 100)
    sched.step_update(50)
    scale_of = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    stem, last, head = (scale_of[id(m.backbone.conv1.weight)], scale_of[id(m.backbone.layer4[1].conv2.weight)],
                        scale_of[id(m.head.weight)])
    assert head == 1.0 and last == 0.5 and stem == pytest.approx(0.5 ** 9)  # 8 blocks between stem and head
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(m.backbone.conv1.weight)] == pytest.approx(lr_of[id(m.head.weight)] * stem)
    n_params = sum(1 for p in m.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_params  # every parameter, once
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(m.head.bias) in no_decay and id(m.backbone.bn1.weight) in no_decay


def _png(v: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), v, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_view_maps_labels_and_the_subset_filter_keeps_its_keys(tmp_path: Path) -> None:
    view = get_method("classify").view_transform(_cfg(tmp_path))
    batch = {"image": np.array([_png(10), _png(20), b"not an image", _png(40)], dtype=object),
             "key": np.array(["k0", "k1", "k2", "k3"]), "label": np.array(["c", "a", "b", "zzz"])}
    kept = keep_keys(batch, frozenset({"k0", "k2", "k3"}))
    out = view(kept)
    assert out["key"].tolist() == ["k0", "k2", "k3"]
    assert out["image"].shape == (3, 3, 32, 32) and out["image"].dtype == np.uint8
    assert out["label"].tolist()[0] == 2 and out["label"].dtype == np.int64
    assert out["valid"].tolist() == [True, False, False]  # undecodable, and a label outside the classes


def test_export_rebuilds_without_the_runs_files(tmp_path: Path) -> None:
    uri, _ = _weights(tmp_path)
    tree = export_config(_cfg(tmp_path, init="pretrained", init_weights=uri, subset_uri="/s.json"))
    assert tree["method"]["init_weights"] is None and tree["method"]["subset_uri"] is None
    rebuilt = Classifier(parse_config(tree))  # builds without the run's files; its weights are the saved ones
    assert rebuilt.classes == ["a", "b", "c"]


def test_stratified_subset_is_seeded_and_keeps_every_class() -> None:
    keys = np.array([f"k{i}" for i in range(300)])
    labels = np.array(["a"] * 200 + ["b"] * 90 + ["c"] * 10)
    s = stratified_subset(keys, labels, 0.1, seed=3)
    assert s == stratified_subset(keys, labels, 0.1, seed=3) != stratified_subset(keys, labels, 0.1, seed=4)
    picked = labels[np.isin(keys, s)]
    assert (picked == "a").sum() == 20 and (picked == "b").sum() == 9 and (picked == "c").sum() == 1
    with pytest.raises(ValueError, match="keys repeat"):
        stratified_subset(np.array(["0", "0", "1"]), np.array(["a", "a", "b"]), 0.5, 0)


def test_unseen_test_labels_are_named() -> None:
    check_test_labels(["a", "b"], np.array(["a", "b", "a"]))
    with pytest.raises(ValueError, match=r"never seen in training: \['q', 'z'\]"):
        check_test_labels(["a", "b"], np.array(["a", "z", "q"]))


def test_config_errors_name_the_field() -> None:
    from raysl.config import ConfigError

    with pytest.raises(ConfigError, match="method.classify.classes"):
        parse_config({"data": {"uri": "/x"}, "method": {"name": "classify", "classes": ["only"]}})
    with pytest.raises(ConfigError, match="method.classify.layer_decay"):
        parse_config({"data": {"uri": "/x"}, "method": {"name": "classify", "classes": ["a", "b"],
                                                          "layer_decay": 2}})


def test_encoder_spec_feeds_the_task_or_says_why() -> None:
    from raysl.eval.finetune import model_section

    cnn = {"backbone": "resnet18", "cifar_stem": False, "image_size": 32, "backbone_kwargs": {},
           "mean": [0.5] * 3, "std": [0.5] * 3}
    assert model_section(cnn, 64)["image_size"] == 64 and model_section(cnn)["mean"] == [0.5] * 3
    vit = {**cnn, "backbone": "vit_tiny_patch16_224", "patch_size": 4}
    assert model_section(vit, 32)["patch_size"] == 4
    with pytest.raises(ValueError, match="was built for 32 px"):
        model_section(vit, 64)
    with pytest.raises(ValueError, match="1-channel"):
        model_section({**cnn, "mean": [0.5], "std": [0.5]})
    with pytest.raises(ValueError, match=r"lacks \['std'\]"):
        model_section({k: v for k, v in cnn.items() if k != "std"})
