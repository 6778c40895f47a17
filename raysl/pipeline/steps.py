"""The work inside the pipeline's steps: validate a snapshot, pretrain on it, score a registered version."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raysl.config import PretrainConfig, builtin_config_path, load_config, parse_config
from raysl.config_base import ConfigError
from raysl.pipeline import registry
from raysl.storage import redact

if TYPE_CHECKING:
    from raysl.pipeline.run import Pipeline

log = logging.getLogger(__name__)


def pretrain_config(p: Pipeline, run: dict[str, Any]) -> PretrainConfig:
    """The pipeline's pretraining config, pointed at the snapshot, named after it, warm-started and tagged."""
    cfg, base = p.cfg, p.base_dir
    src = cfg.pretrain.config
    path = base / src if (base / src).is_file() else Path(src)
    if not path.is_file() and builtin_config_path(src) is None:
        raise ConfigError(f"pretrain.config: {src!r} is neither a file (relative to {base}) nor a built-in config")
    overrides = [*cfg.pretrain.overrides, f"data.uri={run['manifest']}",
                 f"train.run_name={cfg.name}-{run['snapshot']}", f"tracking.register_as={cfg.model_name}",
                 f"tracking.alias={registry.CANDIDATE}"]
    if cfg.tracking_uri:
        overrides.append(f"tracking.tracking_uri={cfg.tracking_uri}")
    if run.get("init_from"):
        overrides.append(f"train.init_from={run['init_from']}")
    tree = load_config(str(path) if path.is_file() else src, overrides).model_dump(mode="json")
    tree["tracking"]["tags"] = {**tree["tracking"]["tags"], "raysl.pipeline": cfg.name,
                                "raysl.snapshot": run["snapshot"], "raysl.snapshot_manifest": redact(run["manifest"]),
                                "raysl.parent_version": str(run.get("parent_version") or "none"),
                                "raysl.pipeline_run_id": run["pipeline_run_id"]}
    return parse_config(tree)


def validate(p: Pipeline, run: dict[str, Any]) -> tuple[int, int, float, list[str]]:
    """Decode a seeded sample of the snapshot's images: (checked, undecodable, allowed fraction, examples)."""
    from raysl.config import MAX_IMAGE_PIXELS
    from raysl.data.sources import read_images
    from raysl.data.views import EvalView
    from raysl.train.launch import init_ray

    pcfg = pretrain_config(p, run)  # a config error surfaces here, before anything trains
    limit = pcfg.data.max_bad_fraction
    if p.cfg.validate_samples == 0:
        return 0, 0, limit, []
    init_ray()
    ds = read_images(pcfg.data.uri, fmt=pcfg.data.format, s3=p.s3, image_column=pcfg.data.image_column,
                     shuffle_files=True, shuffle_seed=0, limit=p.cfg.validate_samples, rows_per_block=None)
    ds = ds.map_batches(EvalView(pcfg.model.image_size, min(pcfg.data.max_image_pixels, MAX_IMAGE_PIXELS)),
                        batch_size=64)
    checked, bad = 0, 0
    examples: list[str] = []
    for b in ds.select_columns(["key", "valid"]).iter_batches(batch_size=256, batch_format="numpy"):
        ok = np.asarray(b["valid"]).astype(bool)
        checked += len(ok)
        bad += int((~ok).sum())
        examples += [str(k) for k in np.asarray(b["key"])[~ok]][: 5 - len(examples)]
    return checked, bad, limit, examples


def pretrain_snapshot(p: Pipeline, run: dict[str, Any]) -> dict[str, Any]:
    from raysl.train.launch import pretrain

    parent = run.get("parent_version")
    if "init_from" not in run:
        run["init_from"] = None
        if p.cfg.warm_start and parent is not None:
            run["init_from"] = registry.checkpoint_of(p.uri, p.cfg.model_name, parent)
            if run["init_from"] is None:
                log.warning("[%s] @champion v%s names no checkpoint; training from scratch", p.cfg.name, parent)
        p._write(f"runs/{run['snapshot']}.json", run)
    log.info("[%s] pretrain on snapshot %s, %s", p.cfg.name, run["snapshot"],
             f"warm start from @champion v{parent} ({redact(run['init_from'])})" if run["init_from"]
             else "from scratch")
    res = pretrain(pretrain_config(p, run))
    if res.model_version == "unregistered":
        raise RuntimeError(f"run {res.run_name} trained but its encoder could not be registered (checkpoint "
                           f"{redact(res.checkpoint_uri)}); rerun the pipeline once MLflow is reachable")
    return {"run_name": res.run_name, "mlflow_run_id": res.run_id, "version": res.model_version,
            "checkpoint": res.checkpoint_uri}


class Evaluator:
    """The pipeline's probe: the labeled split is read once (Ray Data, per image size) and every model is scored
    on those same arrays with raysl's kNN / linear probe, so candidate and champion see identical inputs."""

    def __init__(self, p: Pipeline) -> None:
        self.p = p
        self._splits: dict[int, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = {}

    def _split(self, image_size: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        from sklearn.model_selection import train_test_split

        from raysl.train.labeled import load_labeled
        from raysl.train.launch import init_ray

        if image_size in self._splits:
            return self._splits[image_size]
        ev = self.p.cfg.evaluation
        init_ray()
        cfg = parse_config({"data": {"uri": ev.train}, "model": {"image_size": image_size}})
        train = load_labeled(ev.train, cfg, self.p.s3, ev.label_column)
        if ev.test:
            test = load_labeled(ev.test, cfg, self.p.s3, ev.label_column)
        else:  # a seeded, stratified 30% of `train`, the probe's default
            idx = np.arange(len(train["label"]))
            tr, te = train_test_split(idx, test_size=0.3, random_state=0, stratify=train["label"])
            test = {"image": train["image"][te], "label": train["label"][te], "classes": train["classes"]}
            train = {"image": train["image"][tr], "label": train["label"][tr], "classes": train["classes"]}
        # load_labeled numbers each split's classes on its own; put both on one list of names
        classes = np.union1d(train["classes"], test["classes"])
        for part in (train, test):
            part["label"] = np.searchsorted(classes, part["classes"][part["label"]])
        self._splits[image_size] = (train, test)
        return train, test

    def score(self, model_uri: str) -> float:
        """The configured probe's top-1 of `model_uri` on the pipeline's fixed labeled split."""
        import torch

        from raysl import tracking
        from raysl.eval.knn import extract, knn_top1
        from raysl.eval.linear_probe import linear_probe_top1

        ev = self.p.cfg.evaluation
        if ev.probe == "zero_shot":
            from raysl.eval.probe import zero_shot_probe
            from raysl.train.launch import init_ray

            init_ray()
            rep = zero_shot_probe(model_uri, ev.test or ev.train, label_column=ev.label_column,
                                  tracking_uri=self.p.uri, log_to_mlflow=False)
            return float(rep.scores["zero_shot_top1"])
        encoder, spec, _ = tracking.load_encoder(model_uri, self.p.uri)
        train, test = self._split(int(spec["image_size"]))
        cpu = torch.device("cpu")
        xtr = extract(encoder, train["image"], spec["mean"], spec["std"], cpu)
        xte = extract(encoder, test["image"], spec["mean"], spec["std"], cpu)
        ytr, yte = torch.from_numpy(train["label"]), torch.from_numpy(test["label"])
        if ev.probe == "knn":
            return knn_top1(xtr, ytr, xte, yte, k=ev.k)
        return float(linear_probe_top1(xtr.numpy(), train["label"], xte.numpy(), test["label"]))
