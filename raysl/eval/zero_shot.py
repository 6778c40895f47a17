"""Zero-shot classification and image↔text retrieval for image-text models (CLIP).

Zero-shot: every class name is put into several prompt templates, the text embeddings of one class are
averaged (and re-normalized), and an image gets the class whose embedding is nearest. Retrieval: each
held-out image and its own caption form a pair; recall@K is the share of queries whose partner is among
the K nearest candidates, image→text and text→image, where repeated caption texts count as one candidate.
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
    fewer than K wrong candidates scoring above it (a tie does not count against the query).

    With `captions`, candidates and queries are the DISTINCT caption texts (as COCO counts any of an image's
    captions as right). Image→text: every image is a query and ranks the distinct texts; copies of one text
    collapse to one candidate scored by the mean similarity over its copies (identical texts have identical
    embeddings, so this is their score), and the right answer is the image's own text. Text→image: every
    distinct text is one query (not one per copy, so a frequent text does not weigh more); its right answers
    are all the images carrying it, and it is a hit when any of them is in the top K. Without this, a wrong
    text used by many images counts as many wrong answers, and templated captions ("a photo of a cat") made
    R@1 = R@5 = R@10. With all captions unique (or `captions=None`) both reduce to the plain pairwise recall.
    """
    sim = img_emb @ txt_emb.T  # (N images, N captions)
    n = len(sim)
    if captions is None:
        group = torch.arange(n)
    else:
        _, inverse = np.unique(np.asarray([str(c) for c in captions]), return_inverse=True)
        group = torch.from_numpy(inverse.reshape(-1)).long()
    n_texts = int(group.max()) + 1 if n else 0
    copies = torch.bincount(group, minlength=n_texts).to(sim.dtype)
    # (N images, G texts): mean similarity over each text's copies
    sim_g = torch.zeros(n, n_texts, dtype=sim.dtype).index_add_(1, group, sim) / copies
    correct = group.unsqueeze(1) == torch.arange(n_texts).unsqueeze(0)  # image i carries text g
    out: dict[str, float] = {}
    for name, s, right in (("i2t", sim_g, correct), ("t2i", sim_g.T, correct.T)):
        best = s.masked_fill(~right, float("-inf")).max(dim=1, keepdim=True).values  # best right answer
        rank = ((s > best) & ~right).sum(dim=1)  # wrong candidates ranked above the best right one
        for k in ks:
            out[f"{name}_recall_at_{k}"] = float((rank < k).float().mean()) if len(rank) else 0.0
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
