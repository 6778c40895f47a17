"""Zero-shot classification and image↔text retrieval for image-text models (CLIP).

Zero-shot: every class name is put into several prompt templates, the text embeddings of one class are
averaged (and re-normalized), and an image gets the class whose embedding is nearest. Retrieval: each
held-out image and its own caption form a pair; recall@K is the share of queries whose partner is among
the K nearest candidates, image→text and text→image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from raysl.data.tokenizer import get_tokenizer

log = logging.getLogger(__name__)

TEMPLATES = (
    "a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.",
    "a blurry photo of a {}.", "a low resolution photo of a {}.", "a close-up photo of a {}.",
    "a cropped photo of the {}.", "a bright photo of a {}.", "a dark photo of the {}.",
)


class ImageTextModel(Protocol):
    def embed_images(self, images: torch.Tensor) -> torch.Tensor: ...
    def embed_texts(self, tokens: torch.Tensor) -> torch.Tensor: ...


def _model_device(model: Any) -> torch.device:
    return next(iter(model.parameters())).device  # type: ignore[no-any-return]


@torch.no_grad()
def image_embeddings(model: ImageTextModel, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """uint8 (N, 3, H, W) → (N, E) unit vectors, on the CPU."""
    device = _model_device(model)
    out = [model.embed_images(torch.from_numpy(images[i : i + batch_size]).to(device)).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def text_embeddings(model: ImageTextModel, texts: Sequence[str], context_length: int,
                    batch_size: int = 256) -> torch.Tensor:
    device = _model_device(model)
    ids = torch.from_numpy(get_tokenizer(context_length).encode(list(texts)))
    out = [model.embed_texts(ids[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(ids), batch_size)]
    return torch.cat(out)


def class_name(label: str) -> str:
    return " ".join(str(label).replace("_", " ").replace("-", " ").split())


def class_embeddings(model: ImageTextModel, classes: Sequence[str], context_length: int,
                     templates: Sequence[str] = TEMPLATES) -> torch.Tensor:
    """(C, E): per class, the re-normalized mean over templates of the prompt embeddings."""
    prompts = [t.format(class_name(c)) for c in classes for t in templates]
    emb = text_embeddings(model, prompts, context_length).view(len(classes), len(templates), -1).mean(1)
    return torch.nn.functional.normalize(emb, dim=-1)


def zero_shot_top1(img_emb: torch.Tensor, labels: np.ndarray, cls_emb: torch.Tensor) -> float:
    pred = (img_emb @ cls_emb.T).argmax(dim=1).numpy()
    return float((pred == np.asarray(labels)).mean())


def retrieval_recall(img_emb: torch.Tensor, txt_emb: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                     captions: Sequence[str] | None = None) -> dict[str, float]:
    """Image i and caption i are a pair. Recall@K: the share of queries whose best correct candidate has
    fewer than K wrong candidates scoring above it.

    With `captions`, identical caption texts are one answer (as COCO counts any of an image's captions):
    for an image, every caption equal to its own is correct; for a caption, every image carrying that
    text is. Without this, templated or short captions would make the metric a lottery among duplicates.
    """
    sim = img_emb @ txt_emb.T  # (N images, N captions)
    n = len(sim)
    if captions is None:
        correct = torch.eye(n, dtype=torch.bool)
    else:
        _, group = np.unique(np.asarray([str(c) for c in captions]), return_inverse=True)
        g = torch.from_numpy(group.reshape(-1))
        correct = g.unsqueeze(1) == g.unsqueeze(0)  # (N, N): image i's caption text == caption j's text
    out: dict[str, float] = {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        best = s.masked_fill(~correct, float("-inf")).max(dim=1, keepdim=True).values  # (N, 1)
        rank = ((s > best) & ~correct).sum(dim=1)  # wrong candidates ranked above the best right one
        for k in ks:
            out[f"{name}_recall_at_{k}"] = float((rank < k).float().mean())
    return out


def evaluate(model: ImageTextModel, data: dict[str, Any], context_length: int,
             templates: Sequence[str] = TEMPLATES) -> dict[str, float]:
    """data: uint8 `image` (N,3,H,W), int `label`, `classes` names, and optionally `caption` (N,)."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()  # type: ignore[attr-defined]
    try:
        img = image_embeddings(model, data["image"])
        out = {"zero_shot_top1": zero_shot_top1(img, data["label"],
                                                class_embeddings(model, list(data["classes"]), context_length,
                                                                 templates)),
               "zero_shot_chance": 1.0 / max(len(data["classes"]), 1)}
        captions = data.get("caption")
        if captions is not None and len(captions) == len(img) and all(str(c).strip() for c in captions):
            texts = [str(c) for c in captions]
            out.update(retrieval_recall(img, text_embeddings(model, texts, context_length), captions=texts))
    finally:
        if hasattr(model, "train"):
            model.train(was_training)  # type: ignore[attr-defined]
    return out
