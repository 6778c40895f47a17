"""Driver side of a pretraining run: checks, Ray Data pipeline, TorchTrainer, MLflow run and registration.

A run is named `<method>-<hash of its config>` unless train.run_name is set, so rerunning the same
config continues from its latest checkpoint (Ray Train restores its snapshot from storage) into the
same MLflow run; a finished run is not trained again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raysl import console, storage, tracking
from raysl.config import PretrainConfig, flatten
from raysl.data.sources import read_images, source_columns
from raysl.data.views import EvalView
from raysl.methods import get_method
from raysl.methods.base import describe_encoder
from raysl.models.files import load_encoder_dir
from raysl.storage import S3Settings, redact
from raysl.train.checkpoint import read_model_state
from raysl.train.loop import train_loop_per_worker

log = logging.getLogger(__name__)
STATE_NAME = "raysl-run.json"


@dataclass
class PretrainResult:
    run_name: str
    run_id: str
    model_name: str
    model_version: str
    checkpoint_uri: str
    metrics: dict[str, Any]


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a cluster (address or $RAY_ADDRESS) or start a local one.

    Locally, logical CPUs are doubled: training workers and Ray Data decode tasks share the cores, and
    with only physical CPUs the data tasks can be starved for ever.
    """
    quiet_data()
    if ray.is_initialized():
        return
    console.quiet_ray()
    verbose = console.is_verbose()  # worker and actor output reaches this console only with --verbose
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith("ray://"):
        # Ray Client is not supported: Ray advises running Train and Data drivers on the cluster (Jobs API).
        raise ValueError(f"--address {address}: Ray Client (ray://) is not supported; run the command on the "
                         "cluster with `raysl submit --address http://HEAD:8265 -- <command>`, or pass the "
                         "cluster's own address (HEAD:6379, or auto) on one of its nodes")
    if address:
        ctx = ray.init(address=address, log_to_driver=verbose)
    else:
        # The dashboard process serves the state API, which Ray Train's placement-group cleaner polls every
        # second (without it: "Failed to query Ray Train Controller actor state", once a second). The cleaner
        # finds that API by autodetection, which fails when another Ray instance runs on the machine; a
        # dashboard port chosen here and named in the job's environment spares it the search.
        port = _free_port()
        ctx = ray.init(num_cpus=num_cpus or 2 * (os.cpu_count() or 2), log_to_driver=verbose,
                       dashboard_host="127.0.0.1", dashboard_port=port,
                       runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})
    console.ray_started(getattr(ctx, "address_info", {}).get("session_dir"))  # a ray:// client has none


def quiet_data() -> None:
    """Ray Data's progress bars off unless --verbose: a training dataset re-executes every epoch, and its
    per-operator bars redrew thousands of lines per run. Set before datasets are made (each keeps a copy)."""
    if console.is_verbose():
        return
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_name(cfg: PretrainConfig) -> str:
    if cfg.train.run_name:
        return cfg.train.run_name
    tree = cfg.model_dump(mode="json", exclude={"tracking": True, "eval": {"every"}})
    for key in ("log_every", "fault_at_step", "max_failures"):  # how a run is watched, not what it trains
        tree["train"].pop(key, None)
    digest = hashlib.sha1(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.method.name}-{digest}"


def load_labeled(uri: str, cfg: PretrainConfig, s3: S3Settings, label_column: str | None,
                 max_samples: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Read a small labeled split into memory: uint8 images (N,3,H,W), int labels, class names."""
    caption = cfg.data.caption_column if "caption" in source_columns(uri, s3=s3,
                                                                      caption_column=cfg.data.caption_column) else None
    ds = read_images(uri, s3=s3, with_labels=True, label_column=label_column, caption_column=caption)
    ds = ds.map_batches(EvalView(cfg.model.image_size, cfg.data.max_image_pixels), batch_size=256)
    parts = list(ds.iter_batches(batch_size=1024, batch_format="numpy"))
    if not parts:
        raise ValueError(f"labeled data {redact(uri)!r} yielded no samples")
    cols = ("image", "label", "valid") + (("caption",) if caption else ())
    cat = {k: np.concatenate([p[k] for p in parts]) for k in cols}
    ok = cat["valid"].astype(bool)
    classes, labels = np.unique(cat["label"][ok], return_inverse=True)
    out = {"image": cat["image"][ok], "label": labels.astype(np.int64)}
    if caption:
        out["caption"] = cat["caption"][ok]
    if max_samples is not None and len(labels) > max_samples:
        pick = np.sort(np.random.default_rng(seed).choice(len(labels), max_samples, replace=False))
        out = {k: v[pick] for k, v in out.items()}
    return {**out, "classes": classes}


def _storage(cfg: PretrainConfig, s3: S3Settings) -> tuple[str, Any]:
    fs, path = storage.resolve(cfg.train.storage_path, s3)
    if storage.is_s3(cfg.train.storage_path):
        return path, fs
    Path(path).mkdir(parents=True, exist_ok=True)
    return path, None


def checkpoint_uri(cfg: PretrainConfig, path: str) -> str:
    """A checkpoint's URI with its scheme (Ray gives S3 paths as bucket/key), redacted; warm starts read it."""
    return redact(f"s3://{path}" if storage.is_s3(cfg.train.storage_path) and "://" not in path else path)


def _registered(uri: str, name: str, run_id: str) -> str | None:
    """The version this run already registered (a rerun after a crash between registering and recording it
    must not register a second copy)."""
    found = tracking.client(uri).search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if not found:
        return None
    version = str(min(int(v.version) for v in found))
    log.info("run %s already registered %s version %s; not registering again", run_id, name, version)
    return version


def _read_state(uri: str, s3: S3Settings) -> dict[str, Any]:
    try:
        return dict(json.loads(storage.read_bytes(uri, s3)))
    except (FileNotFoundError, OSError):
        return {}


def pretrain(cfg: PretrainConfig, *, resume: bool = False) -> PretrainResult:
    t_start = time.monotonic()
    method_cls = get_method(cfg.method.name)
    s3 = S3Settings.resolve(cfg.s3.endpoint_url, cfg.s3.region)
    method_cls.check_source(cfg, s3)
    name = run_name(cfg)
    state_uri = f"{cfg.train.storage_path.rstrip('/')}/{name}/{STATE_NAME}"
    state = _read_state(state_uri, s3)
    if resume and not state:
        raise ValueError(f"--resume: no earlier run {name!r} under {redact(cfg.train.storage_path)}")
    uri = tracking.tracking_uri(cfg.tracking.tracking_uri)
    model_name = cfg.tracking.register_as or method_cls.default_model_name()
    if state.get("complete"):
        log.info("run %s already finished (model %s v%s); nothing to train", name, model_name,
                 state.get("model_version"))
        return PretrainResult(name, state["mlflow_run_id"] or "", model_name, state["model_version"],
                              state["checkpoint"], state.get("metrics", {}))

    params = flatten(cfg.model_dump(mode="json"))
    tags = {"raysl.method": cfg.method.name, "raysl.run_name": name, "data_uri": redact(cfg.data.uri),
            **cfg.tracking.tags}
    if commit := tracking.git_commit():
        tags["git_commit"] = commit
    try:
        run_id: str | None = tracking.start_run(uri, cfg.tracking.experiment, name, params, tags,
                                                state.get("mlflow_run_id"))
    except Exception as exc:  # noqa: BLE001 - an MLflow outage must not stop training
        log.warning("MLflow at %s unavailable (%s): training without tracking", redact(uri), exc)
        run_id = None
    storage.write_bytes(state_uri, json.dumps({"mlflow_run_id": run_id}).encode(), s3)
    log.info("MLflow run %s (%s), checkpoints under %s/%s", run_id, uri, redact(cfg.train.storage_path), name)

    init_ray()
    ds, data_counts = method_cls.open_source(cfg, s3)
    if run_id and data_counts:
        tracking.log_metrics(uri, run_id, {f"data_{k}": float(v) for k, v in data_counts.items()}, step=0)
    ds = ds.map_batches(method_cls.view_transform(cfg), batch_size=64, batch_format="numpy")
    if cfg.data.deterministic:
        ds.context.execution_options.preserve_order = True
    eval_ref = None
    if cfg.eval.uri:
        labeled = load_labeled(cfg.eval.uri, cfg, s3, cfg.eval.label_column, cfg.eval.max_samples)
        eval_ref = ray.put(labeled)
    init_ref = None
    if cfg.train.init_from:
        init_ref = ray.put(read_model_state(cfg.train.init_from, s3))
    path, fs = _storage(cfg, s3)
    forward_reports, fetch_reports = console.train_reports()  # progress lines come from the driver, not workers
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "run_id": run_id, "tracking_uri": uri,
                           "eval_ref": eval_ref, "init_ref": init_ref},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(
            name=name, storage_path=path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[forward_reports],
        ),
        datasets={"train": ds},
    )
    log.info("training %s: %d steps, batch %d on %d workers", name, cfg.train.steps, cfg.train.batch_size,
             cfg.train.num_workers)
    try:
        with console.training_progress(cfg.train.steps, fetch_reports):
            result = trainer.fit()
    except Exception:
        if run_id:
            tracking.end_run(uri, run_id, status="FAILED")
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"run {name} produced no checkpoint")
    version = "unregistered"
    with result.checkpoint.as_directory() as d:
        encoder, spec = load_encoder_dir(Path(d))
        spec.update(describe_encoder(cfg), source_run=run_id, **cfg.tracking.tags)
        if run_id:
            try:
                tracking.set_tags(uri, run_id, {"raysl.checkpoint": redact(result.checkpoint.path),
                                                "raysl.checkpoint_uri": checkpoint_uri(cfg, result.checkpoint.path),
                                                "raysl.checkpoint_dir": f"{redact(cfg.train.storage_path)}/{name}"})
                version = (_registered(uri, model_name, run_id)
                           or tracking.register_encoder(uri, run_id, encoder, spec, model_name, cfg.tracking.alias,
                                                        full_dir=Path(d)))
                tracking.end_run(uri, run_id)
            except Exception as exc:  # noqa: BLE001 - the checkpoint holds the encoder; say where, do not crash
                log.warning("could not register the encoder in MLflow (%s); it is in checkpoint %s", exc,
                            redact(result.checkpoint.path))
    ckpt_uri = redact(result.checkpoint.path)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    storage.write_bytes(state_uri, json.dumps({
        "mlflow_run_id": run_id, "complete": version != "unregistered", "model_version": version,
        "checkpoint": ckpt_uri,
        "metrics": metrics}).encode(), s3)
    registered = f"models:/{model_name}@{cfg.tracking.alias} (version {version})" if version != "unregistered" else None
    log.info("%s", console.summary(steps=int(metrics.get("step", cfg.train.steps)), seconds=time.monotonic() - t_start,
                                   metrics=metrics, model=registered, tracking=redact(uri), run_id=run_id,
                                   checkpoint=ckpt_uri))
    return PretrainResult(name, run_id or "", model_name, version, ckpt_uri, metrics)
