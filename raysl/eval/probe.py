"""`raysl probe`: load an encoder from the MLflow registry, embed labeled data with Ray Data, report
kNN (k=20, cosine, temperature-weighted) and linear-probe top-1, next to random init and raw pixels."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from raysl import tracking
from raysl.config import MAX_IMAGE_PIXELS
from raysl.data.sources import read_images
from raysl.data.views import EvalView
from raysl.eval.embed import collect, embed
from raysl.eval.knn import knn_top1
from raysl.eval.linear_probe import linear_probe_top1
from raysl.figures import embedding_plot
from raysl.methods.export import load_full_model
from raysl.storage import S3Settings, redact, redact_exc

log = logging.getLogger(__name__)


@dataclass
class ProbeReport:
    model_uri: str
    n_train: int
    n_test: int
    scores: dict[str, float] = field(default_factory=dict)

    def zero_shot_table(self) -> str:
        s = self.scores
        rows = [f"zero-shot top-1 {s['zero_shot_top1']:.1%} (chance {s['zero_shot_chance']:.1%}, "
                f"{self.n_test} images)"]
        for way in ("i2t", "t2i"):
            if f"{way}_recall_at_1" in s:
                recalls = "  ".join(f"{s[f'{way}_recall_at_{k}']:.1%}" for k in (1, 5, 10))
                rows.append(f"{way} recall@1/5/10  {recalls}")
        return "\n".join(rows)

    def table(self) -> str:
        rows = [f"{'features':<16}{'kNN top-1':>12}{'linear top-1':>14}"]
        for name in ("pretrained", "random_init", "raw_pixels"):
            if f"{name}_knn_top1" in self.scores:
                lin = self.scores.get(f"{name}_linear_top1")
                rows.append(f"{name:<16}{self.scores[f'{name}_knn_top1']:>12.1%}"
                            + (f"{lin:>14.1%}" if lin is not None else f"{'-':>14}"))
        return "\n".join(rows)


def _labeled(uri: str, image_size: int, label_column: str | None, s3: S3Settings, model_uri: str,
             tracking_uri: str | None, baseline: bool, pixels: bool) -> dict[str, np.ndarray]:
    ds = read_images(uri, s3=s3, with_labels=True, label_column=label_column)
    ds = ds.map_batches(EvalView(image_size, MAX_IMAGE_PIXELS), batch_size=256)
    cols = ["embedding", "label"] + (["embedding_random"] if baseline else []) + (["pixels"] if pixels else [])
    return collect(embed(ds, model_uri, tracking_uri=tracking_uri, with_random=baseline, with_pixels=pixels), cols)


def probe(model_uri: str, data_uri: str, *, test_uri: str | None = None, label_column: str | None = None,
          tracking_uri: str | None = None, baseline: bool = True, raw_pixels: bool = False, k: int = 20,
          test_size: float = 0.3, seed: int = 0, log_to_mlflow: bool = True) -> ProbeReport:
    uri = tracking.tracking_uri(tracking_uri)
    _, spec, model_id = tracking.load_encoder(model_uri, uri)
    s3 = S3Settings.resolve()
    args = (spec["image_size"], label_column, s3, model_uri, uri, baseline, raw_pixels)
    train = _labeled(data_uri, *args)
    if test_uri:
        test = _labeled(test_uri, *args)
    else:
        idx = np.arange(len(train["label"]))
        tr, te = train_test_split(idx, test_size=test_size, random_state=seed, stratify=train["label"])
        train, test = {c: v[tr] for c, v in train.items()}, {c: v[te] for c, v in train.items()}
    classes = np.unique(np.concatenate([train["label"], test["label"]]))
    ytr, yte = np.searchsorted(classes, train["label"]), np.searchsorted(classes, test["label"])
    report = ProbeReport(model_uri, len(ytr), len(yte))
    feats = {"pretrained": "embedding", "random_init": "embedding_random", "raw_pixels": "pixels"}
    for name, col in feats.items():
        if col not in train:
            continue
        xtr, xte = train[col].astype(np.float32), test[col].astype(np.float32)
        report.scores[f"{name}_knn_top1"] = knn_top1(torch.from_numpy(xtr), torch.from_numpy(ytr),
                                                     torch.from_numpy(xte), torch.from_numpy(yte), k=k)
        if name != "raw_pixels":
            report.scores[f"{name}_linear_top1"] = linear_probe_top1(xtr, ytr, xte, yte)
    log.debug("probe of %s on %d/%d samples:\n%s", model_uri, report.n_train, report.n_test, report.table())
    if log_to_mlflow:
        _log(uri, model_uri, model_id, spec, report, _embedding_figure(test, yte, classes, model_uri))
    return report


def _embedding_figure(test: dict[str, np.ndarray], labels: np.ndarray, classes: np.ndarray,
                      model_uri: str) -> bytes | None:
    """PCA of the held-out embeddings, pretrained next to random init, coloured by class; None if it fails."""
    panels = {name: test[col] for name, col in (("pretrained", "embedding"), ("random init", "embedding_random"))
              if col in test}
    try:
        return embedding_plot(panels, labels, [str(c) for c in classes], title=f"{redact(model_uri)}, held-out samples")
    except Exception as exc:  # noqa: BLE001 - a picture must not cost the probe's numbers
        log.warning("could not draw the embedding plot: %s", redact_exc(exc))
        return None


def zero_shot_probe(model_uri: str, data_uri: str, *, label_column: str | None = None,
                    tracking_uri: str | None = None, max_samples: int | None = None,
                    log_to_mlflow: bool = True) -> ProbeReport:
    """Zero-shot top-1 from class-name prompts, and image↔text recall@1/5/10 where the data has captions."""
    from raysl.config import PretrainConfig
    from raysl.eval.zero_shot import evaluate
    from raysl.train.labeled import load_labeled

    uri = tracking.tracking_uri(tracking_uri)
    model, tree = load_full_model(model_uri, uri)
    model_id, version = tracking.registry_version(model_uri, uri)  # for _log; no second download
    spec = {"registered_version": version} if version is not None else {}
    cfg = PretrainConfig.model_validate(tree)
    data = load_labeled(data_uri, cfg, S3Settings.resolve(), label_column, max_samples)
    context_length = int(getattr(cfg.method, "context_length", 77))
    report = ProbeReport(model_uri, 0, len(data["label"]), evaluate(model, data, context_length))  # type: ignore[arg-type]
    if log_to_mlflow:
        _log(uri, model_uri, model_id, spec, report)
    return report


def _log(uri: str, model_uri: str, model_id: str | None, spec: dict[str, Any], report: ProbeReport,
         figure: bytes | None = None) -> None:
    """Record the probe as its own MLflow run, linked to the logged model and tagged on the version."""
    try:
        import mlflow

        mlflow.set_tracking_uri(uri)
        # An experiment id, not set_experiment(): that would change the process-wide active experiment, and a
        # later start_run(run_id=…) of a pretraining run in the same process would then refuse to resume.
        client = mlflow.tracking.MlflowClient(uri)
        exp_id = tracking.experiment_id(uri, "raysl-probe")  # with SQLite: artifacts beside the database, not ./mlruns
        with mlflow.start_run(run_name=f"probe {redact(model_uri)}", experiment_id=exp_id) as run:
            mlflow.log_params({"model_uri": redact(model_uri), "n_train": report.n_train, "n_test": report.n_test})
            for key, value in report.scores.items():
                mlflow.log_metric(key, value, model_id=model_id)
            if figure is not None:
                tracking.log_png(client, run.info.run_id, figure, "figures/embeddings_pca.png")
        if "registered_version" in spec and model_uri.startswith("models:/"):
            name = model_uri[len("models:/") :].split("@")[0].split("/")[0]  # name@alias or name/version
            for key, value in report.scores.items():
                client.set_model_version_tag(name, spec["registered_version"], f"probe.{key}", f"{value:.4f}")
    except Exception as exc:  # noqa: BLE001 - the numbers were computed; a tracking outage must not lose them
        log.warning("could not log the probe to MLflow: %s", redact_exc(exc))
