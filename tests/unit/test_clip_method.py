"""CLIP method: feature caching is exact, the temperature stays clamped, the tokenizer works offline."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from raysl.config import PretrainConfig
from raysl.data.tokenizer import Tokenizer, caption_text, json_caption
from raysl.data.views import ImageText
from raysl.methods import get_method
from raysl.methods.clip import CLIP
from tests.unit.test_views import _rgb

CAPTIONS = ["a red circle on the left", "a small blue square", "two green triangles at the top",
            "a yellow star", "an orange circle at the bottom right", "a purple square in the middle",
            "a big red triangle", "a tiny blue star on the right"]


def small_clip(**method: Any) -> CLIP:
    torch.manual_seed(0)
    cfg = PretrainConfig.model_validate({
        "data": {"uri": "unused"},
        "method": {"name": "clip", "embed_dim": 32, "text_width": 32, "text_heads": 2, "text_layers": 2,
                   "context_length": 16, **method},
        # a ViT: LayerNorm only, so micro-batches see exactly what the whole batch sees (BatchNorm would not)
        "model": {"backbone": "vit_tiny_patch16_224", "image_size": 32, "patch_size": 8},
    })
    model = get_method("clip").build(cfg)
    assert isinstance(model, CLIP)
    return model.double()


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"image": torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g),
            "text": torch.from_numpy(Tokenizer(16).encode(CAPTIONS))}


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_feature_caching_equals_one_big_batch(loss: str) -> None:
    whole = small_clip(loss=loss)
    out_whole = whole.forward_backward(whole, batch())
    cached = small_clip(loss=loss, micro_batches=4)
    out_cached = cached.forward_backward(cached, batch())
    assert float(out_cached["loss"]) == pytest.approx(float(out_whole["loss"]), rel=1e-10)
    g_whole, g_cached = grads_of(whole), grads_of(cached)
    assert g_whole.keys() == g_cached.keys()
    for name, g in g_whole.items():
        torch.testing.assert_close(g_cached[name], g, rtol=1e-7, atol=1e-12, msg=name)
    # both towers and the temperature learn
    assert any(n.startswith("visual.") and float(g.abs().max()) > 0 for n, g in g_whole.items())
    assert any(n.startswith("text.") and float(g.abs().max()) > 0 for n, g in g_whole.items())
    assert float(g_whole["log_scale"].abs()) > 0


def test_logit_scale_starts_at_inverse_temperature_and_is_clamped_at_100() -> None:
    model = small_clip()
    assert float(model.logit_scale()) == pytest.approx(1 / 0.07)
    with torch.no_grad():
        model.log_scale.fill_(math.log(1e4))
    assert float(model.logit_scale()) == pytest.approx(100.0)  # clamped in the loss
    model.on_step_end(1, 10)
    assert float(model.log_scale.exp()) == pytest.approx(100.0)  # and the parameter itself is pulled back


def test_matching_pairs_score_higher_after_a_few_steps() -> None:
    model = small_clip().float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    b = batch()
    first = None
    for _ in range(15):
        opt.zero_grad()
        out = model.forward_backward(model, b)
        opt.step()
        first = first if first is not None else float(out["loss"])
    assert float(out["loss"]) < first * 0.5
    assert float(out["batch_i2t_top1"]) > 0.5


def test_tokenizer_round_trips_and_truncates_keeping_end_of_text() -> None:
    tok = Tokenizer(context_length=8)
    ids = tok.encode(["a photo of a cat", "a very long caption that goes on and on and on"])
    assert ids.shape == (2, 8) and ids.dtype == np.int32
    assert tok.decode(ids[0]) == "a photo of a cat"
    assert ids[0, 0] == tok.sot_id and tok.eot_id in ids[0] and ids[0, -1] == 0
    assert ids[1, -1] == tok.eot_id  # cut, but the pooled end-of-text token survives
    assert tok.decode(ids[1]).startswith("a very long caption")
    assert tok.vocab_size == 49408


def test_tokenizer_needs_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert Tokenizer(16).decode(Tokenizer(16).encode(["offline works"])[0]) == "offline works"


def test_captions_from_txt_json_and_bad_samples_are_invalid() -> None:
    assert caption_text(b"  a red  circle\n") == "a red circle"
    assert json_caption(b'{"caption": "a blue square"}', "caption") == "a blue square"
    assert json_caption(b"not json", "caption") == "" and json_caption(b'{"text": "x"}', "caption") == ""
    view = ImageText(32, 10**7, crop_scale=(0.9, 1.0), flip_p=0.0, context_length=16)
    out = view({"image": np.array([_rgb(), b"corrupt", _rgb()], dtype=object),
                "key": np.array(["ok", "bad-image", "no-caption"]),
                "caption": np.array(["a red circle", "a blue square", "  "], dtype=object)})
    assert out["valid"].tolist() == [True, False, False]
    assert out["text"].shape == (3, 16) and out["image"].shape == (3, 3, 32, 32)


def test_captions_file_csv_and_jsonl(tmp_path: Any) -> None:
    from raysl.data.shard import read_captions

    (tmp_path / "c.csv").write_text('file,caption\ncat/1.jpg,"a cat, asleep"\ndog/2.jpg,\n')
    assert read_captions(str(tmp_path / "c.csv")) == {"cat/1.jpg": "a cat, asleep", "dog/2.jpg": ""}
    (tmp_path / "c.jsonl").write_text('{"file": "a.png", "caption": "a red circle"}\n\n')
    assert read_captions(str(tmp_path / "c.jsonl")) == {"a.png": "a red circle"}
    (tmp_path / "bad.csv").write_text("path,text\na.png,x\n")
    with pytest.raises(ValueError, match="needs `file` and `caption`"):
        read_captions(str(tmp_path / "bad.csv"))


def test_retrieval_recall_and_zero_shot_scoring() -> None:
    from raysl.eval.zero_shot import retrieval_recall, zero_shot_top1

    emb = torch.nn.functional.normalize(torch.randn(50, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    perfect = retrieval_recall(emb, emb)
    assert perfect["i2t_recall_at_1"] == 1.0 and perfect["t2i_recall_at_1"] == 1.0
    shifted = retrieval_recall(emb, emb.roll(1, dims=0))  # every caption belongs to the next image
    assert shifted["i2t_recall_at_1"] < 0.2 and shifted["i2t_recall_at_10"] <= shifted["i2t_recall_at_5"] + 1
    assert shifted["i2t_recall_at_1"] <= shifted["i2t_recall_at_5"] <= shifted["i2t_recall_at_10"]
    # identical caption texts are one answer: image 0's caption equals caption 1, which scores higher
    img2 = torch.eye(3, 16)
    txt2 = torch.stack([torch.eye(3, 16)[2], torch.eye(3, 16)[0], torch.eye(3, 16)[1]])
    texts = ["a cat", "a cat", "a dog"]
    assert retrieval_recall(img2, txt2)["i2t_recall_at_1"] == 0.0
    dup = retrieval_recall(img2, txt2, captions=texts)
    assert dup["i2t_recall_at_1"] == pytest.approx(1 / 3)  # image 0 finds "a cat" (caption 1); 1 and 2 miss
    cls = torch.eye(3, 16)
    imgs = torch.eye(3, 16)[[0, 1, 2, 2]]
    assert zero_shot_top1(imgs, np.array([0, 1, 2, 1]), cls) == 0.75


def test_whole_model_export_round_trips(tmp_path: Any) -> None:
    from raysl.methods.base import export_config
    from raysl.methods.export import load_full_dir
    from raysl.models.files import save_full_dir

    model = small_clip().float().eval()
    cfg = PretrainConfig.model_validate({
        "data": {"uri": "s3://secret-bucket/data"},
        "method": {"name": "clip", "embed_dim": 32, "text_width": 32, "text_heads": 2, "text_layers": 2,
                   "context_length": 16},
        "model": {"backbone": "vit_tiny_patch16_224", "image_size": 32, "patch_size": 8},
    })
    tree = export_config(cfg)
    assert tree["data"]["uri"] == "exported" and "train" not in tree  # where the data lived stays private
    save_full_dir(tmp_path, model, tree)
    loaded, _ = load_full_dir(tmp_path)
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed_texts(b["text"]), model.embed_texts(b["text"]))  # type: ignore[operator]
        torch.testing.assert_close(loaded.embed_images(b["image"]), model.embed_images(b["image"]))  # type: ignore[operator]
