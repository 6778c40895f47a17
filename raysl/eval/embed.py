"""Embedding export with Ray Data batch inference: each actor loads the encoder from the registry once."""

from __future__ import annotations

from typing import Any

import numpy as np
import ray.data
import torch
from ray.data.expressions import col

from raysl.data.views import normalize
from raysl.models.backbones import create_backbone
from raysl.tracking import load_encoder


class Embedder:
    """Ray Data actor: uint8 images → embeddings of the registered encoder (and, if asked, of a
    random-init encoder of the same architecture, as a baseline)."""

    def __init__(self, model_uri: str, tracking_uri: str | None = None, with_random: bool = False,
                 with_pixels: bool = False, seed: int = 0) -> None:
        torch.set_num_threads(1)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # a GPU when Ray gave one
        self.model, self.spec, _ = load_encoder(model_uri, tracking_uri)
        self.model.to(self.device)
        self.random = None
        if with_random:
            torch.manual_seed(seed)
            s = self.spec
            self.random = create_backbone(s["backbone"], cifar_stem=s["cifar_stem"], image_size=s["image_size"],
                                          patch_size=s.get("patch_size"), **s.get("backbone_kwargs", {}))
            self.random.eval()
        self.with_pixels = with_pixels

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = normalize(torch.from_numpy(np.ascontiguousarray(batch["image"])), self.spec["mean"], self.spec["std"])
        emb = self.model(x.to(self.device)).float().cpu().numpy()
        out: dict[str, Any] = {"embedding": emb, "valid": batch["valid"], "key": batch["key"]}
        if "label" in batch:
            out["label"] = batch["label"]
        if self.random is not None:
            out["embedding_random"] = self.random(x).numpy()
        if self.with_pixels:
            out["pixels"] = x.flatten(1).numpy()
        return out


def embed(ds: ray.data.Dataset, model_uri: str, *, tracking_uri: str | None = None, with_random: bool = False,
          with_pixels: bool = False, concurrency: int = 1, batch_size: int = 256,
          gpus: float = 0.0) -> ray.data.Dataset:
    """Map a dataset of EvalView rows to embeddings with a fixed pool of `concurrency` actors (each on `gpus`
    GPUs when set); invalid (undecodable) rows are dropped by an Arrow-side predicate, not a Python lambda."""
    out = ds.map_batches(
        Embedder, batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=gpus or None,
        fn_constructor_kwargs={"model_uri": model_uri, "tracking_uri": tracking_uri,
                               "with_random": with_random, "with_pixels": with_pixels},
    )
    return out.filter(expr=col("valid"))


def collect(ds: ray.data.Dataset, columns: list[str]) -> dict[str, np.ndarray]:
    parts = list(ds.select_columns(columns).iter_batches(batch_size=1024, batch_format="numpy"))
    if not parts:
        raise ValueError("no valid samples to embed")
    return {c: np.concatenate([p[c] for p in parts]) for c in columns}
