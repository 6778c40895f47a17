"""`raysl finetune`: a registered encoder → a fine-tuned classifier or detector, on the pretraining loop and
launcher (the downstream tasks are Methods), tracked in MLflow with lineage back to the encoder version.

`init="both"` runs the identical recipe twice — the registered encoder, then the same network at random
init — with the same seed, steps, labeled subset and data order, and prints one table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors.torch import save as save_safetensors

from raysl import storage, tracking
from raysl.config import PretrainConfig, parse_config, set_dotted
from raysl.data.sources import Listing, list_source, read_labels, with_schemas
from raysl.storage import S3Settings, redact, redact_exc

log = logging.getLogger(__name__)
INITS = ("pretrained", "random")


@dataclass
class Source:
    """The registered encoder a job starts from: its spec, lineage tags and weights in run storage."""

    model_uri: str
    spec: dict[str, Any]
    tags: dict[str, str]
    weights_uri: str
    base_name: str


@dataclass
class FinetuneRun:
    init: str
    run_name: str
    run_id: str
    model: str
    version: str
    scores: dict[str, float]
    wall_s: float


@dataclass
class FinetuneReport:
    task: str
    source: str
    runs: list[FinetuneRun] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def table(self, metrics: tuple[str, ...]) -> str:
        head = f"{'init':<12}" + "".join(f"{m:>14}" for m in metrics) + f"{'wall':>8}  registered"
        rows = [head]
        for r in self.runs:
            vals = "".join(f"{r.scores[m]:>14.1%}" if m in r.scores else f"{'-':>14}" for m in metrics)
            rows.append(f"{r.init:<12}{vals}{r.wall_s:>7.0f}s  {r.model} v{r.version}")
        by = {r.init: r.scores for r in self.runs}
        if set(INITS) <= set(by):
            diff = "".join(f"{100 * (by['pretrained'][m] - by['random'][m]):>+11.1f} pt"
                           if m in by["random"] and m in by["pretrained"] else f"{'-':>14}" for m in metrics)
            rows.append(f"{'difference':<12}{diff}")
        return "\n".join(rows)


def prepare_source(model_uri: str, tracking_uri: str, storage_path: str, s3: S3Settings) -> Source:
    """Load the encoder from the registry and put its weights (safetensors) where every worker can read them."""
    encoder, spec, model_id = tracking.load_encoder(model_uri, tracking_uri)
    name = model_uri[len("models:/"):].split("@")[0].split("/")[0] if model_uri.startswith("models:/") else "encoder"
    version = spec.get("registered_version")
    tags = {"raysl.source_model_uri": model_uri, "raysl.source_model": name,
            "raysl.source_version": str(version or ""), "raysl.source_model_id": str(model_id or "")}
    weights = save_safetensors({k: v.contiguous() for k, v in encoder.state_dict().items()})
    digest = hashlib.sha1(weights).hexdigest()[:12]
    weights_uri = f"{storage_path.rstrip('/')}/finetune-init/{name}-{digest}.safetensors"
    if not storage.exists(weights_uri, s3):
        storage.write_bytes(weights_uri, weights, s3)
    return Source(model_uri, spec, tags, weights_uri, name.removesuffix("-encoder"))


def model_section(spec: dict[str, Any], image_size: int | None = None) -> dict[str, Any]:
    """The config's model section that rebuilds the registered encoder and feeds it as it was trained (its
    mean/std); `image_size` other than the recorded one only where the network takes any size (CNNs)."""
    keys = ("backbone", "cifar_stem", "image_size", "patch_size", "backbone_kwargs", "mean", "std")
    missing = [k for k in keys if k not in spec and k != "patch_size"]
    if missing:
        raise ValueError(f"the registered encoder's spec lacks {missing}: it cannot be rebuilt")
    if len(spec["mean"]) != 3 or len(spec["std"]) != 3:
        raise ValueError(f"the registered encoder takes {len(spec['mean'])}-channel input; these tasks feed RGB")
    section = {k: spec[k] for k in keys if k in spec}
    if image_size is not None and image_size != spec["image_size"]:
        if spec["backbone"].startswith(("vit", "deit", "eva")):
            raise ValueError(f"--image-size {image_size}: the registered ViT {spec['backbone']!r} was built for "
                             f"{spec['image_size']} px (its position table is that size); use "
                             f"--image-size {spec['image_size']}")
        section["image_size"] = image_size
    return section


def stratified_subset(keys: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> list[str]:
    """A seeded, stratified `fraction` of the keys: at least one per class."""
    if len(set(keys.tolist())) != len(keys):
        raise ValueError("sample keys repeat, so a label fraction cannot name its samples; give Parquet data a "
                         "unique `key` column (or use --label-fraction 1)")
    rng = np.random.default_rng(seed)
    picked: list[str] = []
    for c in np.unique(labels):
        members = np.sort(keys[labels == c])
        n = max(1, int(round(fraction * len(members))))
        picked += [str(k) for k in rng.choice(members, n, replace=False)]
    return sorted(picked)


def check_test_labels(train_classes: list[str], test_labels: np.ndarray) -> None:
    unseen = sorted(set(map(str, test_labels)) - set(train_classes))
    if unseen:
        raise ValueError(f"the test split has labels never seen in training: {unseen[:20]}"
                         f"{' …' if len(unseen) > 20 else ''}; training classes: {train_classes[:20]}")


def base_tree(source: Source, *, data_uri: str, steps: int, batch_size: int, lr: float, num_workers: int,
              storage_path: str, seed: int, tracking_uri: str, experiment: str,
              image_size: int | None = None) -> dict[str, Any]:
    return {
        "model": model_section(source.spec, image_size),
        "data": {"uri": data_uri, "deterministic": True},
        "optim": {"name": "adamw", "lr": lr, "scale_lr": False, "weight_decay": 0.05,
                  "warmup_steps": max(1, steps // 10)},
        "train": {"steps": steps, "batch_size": batch_size, "num_workers": num_workers, "seed": seed,
                  "storage_path": storage_path, "log_every": max(1, min(10, steps // 5)),
                  "checkpoint_every": max(1, steps // 2)},
        "tracking": {"tracking_uri": tracking_uri, "experiment": experiment, "tags": dict(source.tags)},
    }


def run_inits(tree: dict[str, Any], inits: list[str], overrides: list[str], register_as: str,
              tags: dict[str, str], score: Callable[[PretrainConfig, Any], dict[str, float]],
              listings: Sequence[Listing] = ()) -> list[FinetuneRun]:
    """Run the same recipe once per init (random init after pretrained, so both draw the same head), register
    each (random init under `<name>-scratch`) and tag its version with the scores `score` returns. `listings`:
    the data's listings, made once for every run (and the same files for each)."""
    from raysl.train.launch import pretrain

    runs = []
    for init in inits:
        t = json.loads(json.dumps(tree))
        t["method"]["init"] = init
        if init == "random":
            t["method"]["init_weights"] = None
        t["tracking"]["register_as"] = register_as + ("-scratch" if init == "random" else "")
        t["tracking"]["tags"] = {**t["tracking"]["tags"], **tags, "raysl.init": init}
        for o in overrides:
            set_dotted(t, o)
        cfg = parse_config(t)
        start = time.perf_counter()
        result = pretrain(cfg, listings=listings)
        scores = score(cfg, result)
        wall = time.perf_counter() - start
        _tag_version(cfg, result.model_name, result.model_version, result.run_id, scores)
        runs.append(FinetuneRun(init, result.run_name, result.run_id, result.model_name, result.model_version,
                                scores, wall))
        log.info("%s init: %s", init, " ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    return runs


def _tag_version(cfg: PretrainConfig, name: str, version: str, run_id: str, scores: dict[str, float]) -> None:
    try:
        client = tracking.client(tracking.tracking_uri(cfg.tracking.tracking_uri))
        for k, v in scores.items():
            if version != "unregistered":
                client.set_model_version_tag(name, version, k, f"{v:.4f}")
            if run_id:
                client.log_metric(run_id, f"final_{k}", v)
    except Exception as exc:  # noqa: BLE001 - the scores are printed either way
        log.warning("could not tag %s v%s with its scores: %s", name, version, redact_exc(exc))


def finetune_classification(model_uri: str, data_uri: str, test_uri: str, *, label_fraction: float = 1.0,
                            init: str = "both", steps: int = 200, batch_size: int = 64, lr: float = 1e-3,
                            freeze_steps: int = 0, layer_decay: float | None = None,
                            label_column: str | None = None, num_workers: int = 2,
                            storage_path: str = "./raysl-runs", tracking_uri: str | None = None, seed: int = 0,
                            image_size: int | None = None, overrides: list[str] | None = None) -> FinetuneReport:
    if not 0 < label_fraction <= 1:
        raise ValueError(f"--label-fraction must be in (0, 1], got {label_fraction}")
    s3 = S3Settings.resolve()
    uri = tracking.tracking_uri(tracking_uri)
    source = prepare_source(model_uri, uri, storage_path, s3)
    # each split listed once, here: the label passes, every run's training files and its evaluation reuse it
    data, test = (with_schemas(list_source(u, s3=s3), s3) for u in (data_uri, test_uri))
    keys, labels = read_labels(data, s3=s3, label_column=label_column)
    classes = sorted(set(map(str, labels)))
    _, test_labels = read_labels(test, s3=s3, label_column=label_column)
    check_test_labels(classes, test_labels)
    subset_uri = None
    n_train = len(keys)
    if label_fraction < 1.0:
        subset = stratified_subset(keys, labels, label_fraction, seed)
        n_train = len(subset)
        blob = json.dumps(subset).encode()
        subset_uri = f"{storage_path.rstrip('/')}/finetune-subsets/{hashlib.sha1(blob).hexdigest()[:12]}.json"
        if not storage.exists(subset_uri, s3):
            storage.write_bytes(subset_uri, blob, s3)
    log.info("classification: %d of %d labeled samples (%g), %d classes, test %d, from %s", n_train, len(keys),
             label_fraction, len(classes), len(test_labels), redact(data_uri))
    tree = base_tree(source, data_uri=data_uri, steps=steps, batch_size=batch_size, lr=lr, num_workers=num_workers,
                     storage_path=storage_path, seed=seed, tracking_uri=uri, experiment="raysl-finetune",
                     image_size=image_size)
    tree["data"]["label_column"] = label_column
    tree["method"] = {"name": "classify", "classes": classes, "init_weights": source.weights_uri,
                      "subset_uri": subset_uri, "label_fraction": label_fraction, "freeze_steps": freeze_steps,
                      "layer_decay": layer_decay}
    # The held-out split is scored by the loop's online evaluation at the last step (the method's test_top1).
    tree["eval"] = {"uri": test_uri, "label_column": label_column, "every": steps, "max_samples": 1_000_000}

    def score(cfg: PretrainConfig, result: Any) -> dict[str, float]:
        if "test_top1" not in result.metrics:
            raise RuntimeError(f"run {result.run_name} reported no test_top1")
        return {"test_top1": float(result.metrics["test_top1"])}

    inits = list(INITS) if init == "both" else [init]
    tags = {"raysl.label_fraction": str(label_fraction), "raysl.task": "classification",
            "raysl.labeled_samples": str(n_train)}
    report = FinetuneReport("classification", model_uri, counts={"labeled": n_train, "test": len(test_labels)})
    report.runs = run_inits(tree, inits, overrides or [], f"{source.base_name}-classifier", tags, score,
                            listings=(data, test))
    return report
