"""A registered encoder loads without unpickling anything, by every road downstream jobs take (tracking.load_encoder
for probe / finetune, the embed actor, the whole-model loader, `mlflow.pyfunc.load_model(...).predict`); and a
version whose spec asks for remote weights is refused, with the field named, before anything is fetched."""

from __future__ import annotations

import json
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest
import torch

from raysl import tracking
from raysl.config import parse_config
from raysl.methods.base import describe_encoder, export_config, get_method
from raysl.models.files import FULL_CONFIG, save_encoder_dir, save_full_dir

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CFG = parse_config({"data": {"uri": "/unused"},
                    "model": {"backbone": "resnet10t", "image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
                    "method": {"name": "byol", "projector_hidden": 32, "projector_dim": 16, "predictor_hidden": 32}})
EVIL_URL = "https://weights.evil.example/backdoor.pth"


class Calls(list[str]):
    """What the patched loaders and downloaders were asked to do; each call also raises."""

    def trap(self, name: str) -> Any:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            self.append(name)
            raise AssertionError(f"{name} was called while loading a registered model")

        return refuse


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> Iterator[Calls]:
    calls = Calls()
    for module, attr in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                         (cloudpickle, "load"), (cloudpickle, "loads")):
        monkeypatch.setattr(module, attr, calls.trap(f"{module.__name__}.{attr}"))
    real_torch_load = torch.load

    def torch_load(*args: Any, weights_only: bool | None = None, **kwargs: Any) -> Any:
        if weights_only is not True:  # only torch's restricted unpickler is acceptable
            return calls.trap("torch.load(weights_only=False)")()
        return real_torch_load(*args, weights_only=True, **kwargs)

    monkeypatch.setattr(torch, "load", torch_load)
    yield calls
    assert not calls, f"unpickling was attempted: {calls}"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[Calls]:
    """Every way timm / torch / huggingface_hub fetch weights; the MLflow client uses `requests`, untouched."""
    import urllib.request

    import timm.models._builder as builder
    import timm.models._hub as hub

    calls = Calls()
    targets = [(urllib.request, "urlopen"), (torch.hub, "download_url_to_file"),
               (torch.hub, "load_state_dict_from_url"), (builder, "load_state_dict_from_url"),
               (builder, "download_cached_file"), (builder, "load_state_dict_from_hf"),
               (hub, "download_url_to_file"), (hub, "download_cached_file"), (hub, "hf_hub_download"),
               (hub, "load_state_dict_from_hf"), (hub, "load_model_config_from_hf")]
    try:
        import huggingface_hub

        targets += [(huggingface_hub, "hf_hub_download"), (huggingface_hub, "snapshot_download")]
    except ImportError:
        pass
    for module, attr in targets:
        if hasattr(module, attr):
            monkeypatch.setattr(module, attr, calls.trap(f"{module.__name__}.{attr}"))
    yield calls
    assert not calls, f"a download was attempted: {calls}"


def _run(uri: str, name: str) -> str:
    client = tracking.client(uri)
    return str(client.create_run(tracking.experiment_id(uri, "it-registry-safety"), run_name=name).info.run_id)


@pytest.fixture(scope="module")
def registered(mlflow_server: str) -> tuple[str, torch.nn.Module]:
    """A real BYOL method (resnet10t at 32 px) registered the way `raysl pretrain` does: encoder + whole model."""
    torch.manual_seed(0)
    method = get_method("byol").build(CFG).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_full_dir(Path(tmp), method, export_config(CFG))
        tracking.register_encoder(mlflow_server, _run(mlflow_server, "good"), method.encoder(),
                                  describe_encoder(CFG), "it-safe-encoder", "candidate", full_dir=Path(tmp))
    return "models:/it-safe-encoder@candidate", method.encoder()


def test_loading_never_unpickles(registered: tuple[str, torch.nn.Module], mlflow_server: str, tmp_path: Path,
                                 no_unpickling: Calls, offline: Calls) -> None:
    import mlflow.pyfunc

    from raysl.data.views import normalize
    from raysl.eval.embed import Embedder
    from raysl.eval.finetune import prepare_source
    from raysl.methods.export import load_full_model
    from raysl.storage import S3Settings

    model_uri, original = registered
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    with torch.no_grad():
        expected = original(normalize(torch.from_numpy(images), [0.5] * 3, [0.25] * 3)).numpy()

    encoder, spec, _ = tracking.load_encoder(model_uri, mlflow_server)  # probe, finetune, pipeline evaluate
    assert spec["backbone"] == "resnet10t" and spec["registered_version"] == "1"
    with torch.no_grad():
        got = encoder(normalize(torch.from_numpy(images), spec["mean"], spec["std"])).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)

    embedder = Embedder(model_uri, mlflow_server)  # the embed / probe Ray Data actor, built in-process
    out = embedder({"image": images, "valid": np.ones(4, bool), "key": np.array(["a", "b", "c", "d"])})
    np.testing.assert_allclose(out["embedding"], expected, atol=1e-5)

    source = prepare_source(model_uri, mlflow_server, str(tmp_path / "runs"), S3Settings())  # raysl finetune
    assert source.spec["backbone"] == "resnet10t"

    full, tree = load_full_model(model_uri, mlflow_server)  # whole models (CLIP zero-shot, classifiers)
    assert tree["method"]["name"] == "byol"
    with torch.no_grad():
        np.testing.assert_allclose(full.encoder()(normalize(torch.from_numpy(images), [0.5] * 3, [0.25] * 3)),
                                   expected, atol=1e-5)

    pyfunc = mlflow.pyfunc.load_model(model_uri)  # serving: models-from-code, no python_model.pkl
    np.testing.assert_allclose(pyfunc.predict(images), expected, atol=1e-5)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        assert not list(local.rglob("*.pkl")) and [p.name for p in local.rglob("pyfunc_encoder.py")]


def _register_tampered(uri: str, name: str, spec: dict[str, Any], tree: dict[str, Any] | None = None) -> str:
    """A version written by someone who skips raysl: real weights, a spec of their choosing."""
    import mlflow
    import mlflow.pyfunc

    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_encoder_dir(folder, get_method("byol").build(CFG).encoder(), describe_encoder(CFG))
        (folder / "encoder.json").write_text(json.dumps(spec))
        artifacts = {"weights": str(folder / "encoder.safetensors"), "spec": str(folder / "encoder.json")}
        if tree is not None:
            (folder / FULL_CONFIG).write_text(json.dumps(tree))
            artifacts["full_config"] = str(folder / FULL_CONFIG)
        with mlflow.start_run(run_id=_run(uri, name)):
            info = mlflow.pyfunc.log_model(name="encoder", python_model=str(tracking.PYFUNC_CODE), artifacts=artifacts,
                                           registered_model_name=name, pip_requirements=["raysl"])
    tracking.client(uri).set_registered_model_alias(name, "candidate", str(info.registered_model_version))
    return f"models:/{name}@candidate"


TAMPERED = {  # what a hostile version asks for → the refusal that names the field
    "url": ({"backbone_kwargs": {"pretrained": True, "pretrained_cfg_overlay": {"url": EVIL_URL}}},
            r"backbone_kwargs\.pretrained: refused"),
    "hub": ({"backbone": "hf-hub:timm/resnet18.a1_in1k"}, r"backbone: 'hf-hub:timm/resnet18\.a1_in1k' is not a plain"),
}


@pytest.fixture(scope="module")
def tampered(mlflow_server: str) -> dict[str, str]:
    """One hostile version per TAMPERED entry (encoder.json and model.json alike), registered before any patch."""
    uris = {}
    for key, (change, _) in TAMPERED.items():
        tree = export_config(CFG)
        tree["model"].update(change)
        uris[key] = _register_tampered(mlflow_server, f"it-evil-{key}", {**describe_encoder(CFG), **change}, tree)
    return uris


@pytest.mark.parametrize("kind", list(TAMPERED))
def test_remote_weights_are_refused(tampered: dict[str, str], mlflow_server: str, kind: str,
                                    no_unpickling: Calls, offline: Calls) -> None:
    import mlflow.pyfunc

    from raysl.eval.embed import Embedder
    from raysl.methods.export import load_full_model

    model_uri, refusal = tampered[kind], TAMPERED[kind][1]
    with pytest.raises(ValueError, match=refusal):
        tracking.load_encoder(model_uri, mlflow_server)
    with pytest.raises(ValueError, match=refusal):
        Embedder(model_uri, mlflow_server)
    with pytest.raises(ValueError, match=refusal):
        load_full_model(model_uri, mlflow_server)
    with pytest.raises(Exception, match=refusal):  # MLflow may wrap load_context's ValueError in its own type
        mlflow.pyfunc.load_model(model_uri)
