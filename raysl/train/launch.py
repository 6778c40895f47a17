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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.data
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raysl import console, storage, tracking
from raysl.config import PretrainConfig, flatten
from raysl.data.sources import Listing
from raysl.lock import LockHeld, RunLock
from raysl.methods import get_method
from raysl.storage import S3Settings, StorageError, redact
from raysl.train.checkpoint import read_model_state
from raysl.train.errors import RunStopped
from raysl.train.labeled import load_labeled
from raysl.train.loop import FATAL_FILE, train_loop_per_worker
from raysl.train.register import RegistrationError, register_checkpoint
from raysl.train.resources import check_fits
from raysl.train.run_state import RunState, read_state, state_uri, write_state
from raysl.train.stream import TRACE_ENV, data_defaults

log = logging.getLogger(__name__)


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
    data_defaults()
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_name(cfg: PretrainConfig) -> str:
    if cfg.train.run_name:
        return cfg.train.run_name
    tree = cfg.model_dump(mode="json", exclude={"tracking": True, "eval": {"every"}})
    # how a run is watched and waited for, not what it trains
    for key in ("log_every", "max_failures", "placement_timeout_s", "lock_wait_s", "lock_ttl_s"):
        tree["train"].pop(key, None)
    digest = hashlib.sha1(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.method.name}-{digest}"


def _storage(cfg: PretrainConfig, s3: S3Settings) -> tuple[str, Any]:
    fs, path = storage.resolve(cfg.train.storage_path, s3)
    if storage.is_s3(cfg.train.storage_path):
        return path, fs
    Path(path).mkdir(parents=True, exist_ok=True)
    return path, None


def checkpoint_uri(cfg: PretrainConfig, path: str) -> str:
    """A checkpoint's URI with its scheme (Ray gives S3 paths as bucket/key), redacted; warm starts read it."""
    return redact(f"s3://{path}" if storage.is_s3(cfg.train.storage_path) and "://" not in path else path)


def _open_state(cfg: PretrainConfig, s3: S3Settings, name: str, resume: bool) -> tuple[str, RunState | None]:
    uri = state_uri(cfg.train.storage_path, name)
    state = read_state(uri, s3)
    if resume and state is None:
        raise ValueError(f"--resume: no earlier run {name!r} under {redact(cfg.train.storage_path)}")
    return uri, state


def known_listing(listings: Sequence[Listing], uri: str | None, fmt: str = "auto") -> Listing | None:
    """The caller's listing of `uri` (in format `fmt` unless that is "auto"), if it made one."""
    return next((li for li in listings if li.uri == uri and fmt in ("auto", li.fmt)), None)


def pretrain(cfg: PretrainConfig, *, resume: bool = False, listings: Sequence[Listing] = ()) -> PretrainResult:
    """Train (or continue, or only register) the run this config names; one run of a config at a time.

    The data is listed once, here (check_source), and that listing feeds the workers' file list; `listings`: ones
    the caller made already (of data.uri or eval.uri), used instead of listing those URIs again."""
    s3 = S3Settings.resolve(cfg.s3.endpoint_url, cfg.s3.region)
    method_cls = get_method(cfg.method.name)
    method_cls.check_config(cfg)
    listing = method_cls.check_source(cfg, s3, known_listing(listings, cfg.data.uri, cfg.data.format))
    listings = [*listings, listing] if listing is not None else list(listings)
    name = run_name(cfg)
    lock_uri = f"{cfg.train.storage_path.rstrip('/')}/{name}/raysl-run.lock"
    try:
        lock = RunLock(lock_uri, ttl=cfg.train.lock_ttl_s, s3=s3, wait_s=cfg.train.lock_wait_s)
        lock.acquire()
    except LockHeld as exc:
        raise LockHeld(f"run {name} is already running ({exc}); it is not started twice "
                       "(train.lock_wait_s makes this one wait for it)") from None
    except OSError as exc:
        raise StorageError(f"train.storage_path {redact(cfg.train.storage_path)!r} is not writable: "
                           f"{redact(str(exc))[:300]}") from None
    try:
        return _pretrain(cfg, s3, name, resume, listings)
    finally:
        lock.release()


def _pretrain(cfg: PretrainConfig, s3: S3Settings, name: str, resume: bool, listings: Sequence[Listing],
              ) -> PretrainResult:
    t_start = time.monotonic()
    method_cls = get_method(cfg.method.name)
    state_at, state = _open_state(cfg, s3, name, resume)
    uri = tracking.tracking_uri(cfg.tracking.tracking_uri)
    model_name = cfg.tracking.register_as or method_cls.default_model_name()
    if state is not None and state.complete:
        log.info("run %s already finished (model %s v%s); nothing to train", name, model_name, state.model_version)
        return PretrainResult(name, state.mlflow_run_id or "", model_name, str(state.model_version),
                              checkpoint_uri(cfg, str(state.checkpoint)), state.metrics)
    state = state or RunState()
    run_id = _start_run(cfg, uri, name, state.mlflow_run_id)
    state.mlflow_run_id = run_id or state.mlflow_run_id  # an outage on resume keeps the run id it had
    write_state(state_at, state, s3)
    log.info("MLflow run %s (%s), checkpoints under %s/%s", run_id, redact(uri), redact(cfg.train.storage_path),
             name)
    path, fs = _storage(cfg, s3)
    if state.trained and state.checkpoint:  # trained earlier; only registration is left
        log.info("run %s finished training earlier; registering its checkpoint %s", name, state.checkpoint)
        ckpt = ray.train.Checkpoint(path=state.checkpoint, filesystem=fs)
    else:
        ckpt, state.metrics = _train(cfg, s3, name, uri, state.mlflow_run_id, path, fs, listings)
        state.trained, state.checkpoint = True, ckpt.path
        write_state(state_at, state, s3)
    version = _finish(cfg, uri, name, model_name, state, ckpt)
    state.complete, state.model_version = True, version
    write_state(state_at, state, s3)
    ckpt_uri = checkpoint_uri(cfg, ckpt.path)
    log.info("%s", console.summary(steps=int(state.metrics.get("step", cfg.train.steps)),
                                   seconds=time.monotonic() - t_start, metrics=state.metrics,
                                   model=f"models:/{model_name}@{cfg.tracking.alias} (version {version})",
                                   tracking=redact(uri), run_id=state.mlflow_run_id, checkpoint=ckpt_uri))
    return PretrainResult(name, state.mlflow_run_id or "", model_name, version, ckpt_uri, state.metrics)


def _start_run(cfg: PretrainConfig, uri: str, name: str, previous: str | None) -> str | None:
    params = flatten(cfg.model_dump(mode="json"))
    tags = {"raysl.method": cfg.method.name, "raysl.run_name": name, "data_uri": redact(cfg.data.uri),
            **cfg.tracking.tags}
    if commit := tracking.git_commit():
        tags["git_commit"] = commit
    try:
        return tracking.start_run(uri, cfg.tracking.experiment, name, params, tags, previous)
    except Exception as exc:  # noqa: BLE001 - an MLflow outage must not stop training
        log.warning("MLflow at %s unavailable (%s): training without tracking until it answers", redact(uri),
                    redact(str(exc))[:200])
        return None


def _train(cfg: PretrainConfig, s3: S3Settings, name: str, uri: str, run_id: str | None, path: str,
           fs: Any, listings: Sequence[Listing] = ()) -> tuple[Any, dict[str, Any]]:
    """Ray Train over this run's workers; (the final checkpoint, the last metrics). `listings`: the data's (and
    the caller's) listings, used instead of listing those URIs again."""
    method_cls = get_method(cfg.method.name)
    init_ray()
    tc = cfg.train
    check_fits(tc.num_workers, tc.cpus_per_worker, 1.0 if tc.use_gpu else 0.0, tc.placement_timeout_s)
    listing = known_listing(listings, cfg.data.uri, cfg.data.format)
    files = method_cls.source_files(cfg, s3, listing)
    datasets: dict[str, Any] = {}
    files_ref = None
    if files is not None:  # each worker reads its own part of every epoch (raysl.train.stream)
        files_ref = ray.put(files)
        log.info("%d files; each of %d workers reads its part of a seeded order per epoch", len(files),
                 tc.num_workers)
    else:
        ds, data_counts = method_cls.open_source(cfg, s3, listing=listing)
        if run_id and data_counts:
            tracking.log_metrics(uri, run_id, {f"data_{k}": float(v) for k, v in data_counts.items()}, step=0)
        ds = ds.map_batches(method_cls.view_transform(cfg), batch_size=64, batch_format="numpy")
        if cfg.data.deterministic:
            ds.context.execution_options.preserve_order = True
        datasets = {"train": ds}
    eval_ref = None
    if cfg.eval.uri:
        eval_source = known_listing(listings, cfg.eval.uri) or cfg.eval.uri
        eval_ref = ray.put(load_labeled(eval_source, cfg, s3, cfg.eval.label_column, cfg.eval.max_samples))
    init_ref = ray.put(read_model_state(tc.init_from, s3)) if tc.init_from else None
    forward_reports, fetch_reports = console.train_reports()  # progress lines come from the driver, not workers
    fatal_uri = f"{tc.storage_path.rstrip('/')}/{name}/{FATAL_FILE}"
    if storage.exists(fatal_uri, s3):  # the reason an earlier attempt stopped; this one may not
        fatal_fs, fatal_path = storage.resolve(fatal_uri, s3)
        fatal_fs.delete_file(fatal_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "run_id": run_id, "tracking_uri": uri,
                           "eval_ref": eval_ref, "init_ref": init_ref, "files_ref": files_ref,
                           "trace_dir": os.environ.get(TRACE_ENV), "fatal_uri": fatal_uri},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(
            name=name, storage_path=path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            callbacks=[forward_reports],
        ),
        datasets=datasets or None,
    )
    log.info("training %s: %d steps, batch %d on %d workers", name, tc.steps, tc.batch_size, tc.num_workers)
    try:
        with console.training_progress(tc.steps, fetch_reports):
            result = trainer.fit()
    except Exception:
        if run_id:
            tracking.end_run(uri, run_id, status="FAILED")
        raise
    fatal = storage.read_bytes(fatal_uri, s3).decode() if storage.exists(fatal_uri, s3) else None
    if fatal or result.checkpoint is None:
        if run_id:
            tracking.end_run(uri, run_id, status="FAILED")
        raise RunStopped(f"run {name} stopped: {fatal or 'it produced no checkpoint'}")
    return result.checkpoint, {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}


def _finish(cfg: PretrainConfig, uri: str, name: str, model_name: str, state: RunState, ckpt: Any) -> str:
    """Register the final checkpoint; the version. MLflow down since the start: the run is created now."""
    run_id = state.mlflow_run_id or _start_run(cfg, uri, name, None)
    if run_id is None:
        raise RegistrationError(f"training finished but MLflow at {redact(uri)} did not answer, so the encoder "
                                f"is not registered. The checkpoint {redact(ckpt.path)} is kept; run the same "
                                "command again to register it without training again")
    state.mlflow_run_id = run_id
    tags = {"raysl.checkpoint": redact(ckpt.path), "raysl.checkpoint_uri": checkpoint_uri(cfg, ckpt.path),
            "raysl.checkpoint_dir": f"{redact(cfg.train.storage_path)}/{name}"}
    with ckpt.as_directory() as d:
        return register_checkpoint(cfg, uri, run_id, model_name, Path(d), tags)
