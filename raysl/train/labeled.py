"""A small labeled split read into memory (online kNN, the pipeline's evaluation, probes).

With `max_samples`, the rows are chosen from the keys and labels alone, before any image is decoded, so a
large split never sits in memory whole. Rows come back sorted by key: the same split gives the same arrays,
run after run. The split is listed once (or not at all, given a `Listing`) and that listing feeds the column check,
the label pass and the image pass.
"""

from __future__ import annotations

import numpy as np

from raysl.config import PretrainConfig
from raysl.data.sources import Listing, list_source, read_images, read_labels, source_columns, with_schemas
from raysl.data.views import EvalView, keep_keys
from raysl.storage import S3Settings, redact


def load_labeled(source: str | Listing, cfg: PretrainConfig, s3: S3Settings, label_column: str | None,
                 max_samples: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """uint8 images (N,3,H,W), int labels, class names (and captions where the split has them), from a URI or a
    `Listing` of one."""
    listing = source if isinstance(source, Listing) else list_source(source, s3=s3)
    listing = with_schemas(listing, s3)  # Parquet: every footer read once, for the columns, labels and images
    uri = listing.uri
    caption = cfg.data.caption_column if "caption" in source_columns(listing, s3=s3,
                                                                      caption_column=cfg.data.caption_column) else None
    ds = read_images(listing, s3=s3, with_labels=True, label_column=label_column, caption_column=caption)
    if max_samples is not None:
        keys, _ = read_labels(listing, s3=s3, label_column=label_column)
        if len(keys) > max_samples:
            picked = np.random.default_rng(seed).choice(len(keys), max_samples, replace=False)
            ds = ds.map_batches(keep_keys, fn_kwargs={"keys": frozenset(keys[picked].tolist())},  # type: ignore[arg-type]
                                batch_format="numpy")
    ds = ds.map_batches(EvalView(cfg.model.image_size, cfg.data.max_image_pixels), batch_size=256)
    parts = list(ds.iter_batches(batch_size=1024, batch_format="numpy"))
    if not parts:
        raise ValueError(f"labeled data {redact(uri)!r} yielded no samples")
    cols = ("image", "label", "valid", "key") + (("caption",) if caption else ())
    cat = {k: np.concatenate([p[k] for p in parts]) for k in cols}
    ok = cat["valid"].astype(bool)
    order = np.argsort(cat["key"][ok].astype(str), kind="stable")
    classes, labels = np.unique(cat["label"][ok][order], return_inverse=True)
    out = {"image": cat["image"][ok][order], "label": labels.astype(np.int64)}
    if caption:
        out["caption"] = cat["caption"][ok][order]
    return {**out, "classes": classes}
