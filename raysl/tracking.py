"""MLflow: the driver creates (or resumes) the run, rank 0 logs metrics, the driver registers the encoder.

An MLflow outage never kills training: workers log from a background thread that buffers metrics through
the outage and sends them once MLflow answers (raysl/metric_logger.py). Encoders are registered as pyfunc
models logged as code (models/pyfunc_encoder.py) whose weights are safetensors plus a JSON spec, so loading
one never unpickles anything. Every URI, exception text, param and tag that leaves this module goes through
`storage.redact`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from raysl.models.files import FULL_CONFIG, FULL_WEIGHTS, TIMM_CONFIG, load_encoder_dir, save_encoder_dir
from raysl.storage import RedactingFilter, redact, redact_exc, redacted_errors

log = logging.getLogger(__name__)
_TRANSIENT = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# The pyfunc wrapper MLflow copies into every registered model and runs on load (models-from-code).
PYFUNC_CODE = Path(__file__).resolve().parent / "models" / "pyfunc_encoder.py"


def tracking_uri(configured: str | None = None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path('mlflow.db').absolute()}"


def _guard(uri: str) -> None:
    """Keep `uri`'s secrets out of what MLflow itself writes: its log handlers get the redacting filter, and a URI
    with userinfo turns off the "View run at <url>" lines MLflow prints to stdout with the URL verbatim."""
    import mlflow  # noqa: F401 - configures the "mlflow" logger's handlers, which are filtered below

    for handler in logging.getLogger("mlflow").handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    if redact(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def _client(uri: str) -> Any:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    for k, v in _TRANSIENT.items():  # fail fast in an outage instead of minutes of back-off; env wins
        os.environ.setdefault(k, v)
    _guard(uri)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def client(uri: str) -> Any:
    """An MlflowClient for `uri`, with short HTTP retries (an outage fails fast instead of backing off)."""
    return _client(uri)


def experiment_id(uri: str, name: str) -> str:
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    location = None
    if uri.startswith("sqlite:///"):  # keep local artifacts next to the database, not in the CWD
        location = Path(uri[len("sqlite:///") :]).parent.joinpath("mlartifacts").absolute().as_uri()
    return str(client.create_experiment(name, artifact_location=location))


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def start_run(uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str],
              resume_run_id: str | None = None) -> str:
    """Create the MLflow run (or reopen `resume_run_id`) and log params once; returns the run id."""
    client = _client(uri)
    if resume_run_id:
        client.update_run(resume_run_id, status="RUNNING")
        return resume_run_id
    log.debug("MLflow run %s in experiment %s at %s", run_name, experiment, redact(uri))
    run = client.create_run(experiment_id(uri, experiment), run_name=run_name,
                            tags={k: redact(str(v)) for k, v in tags.items()})
    from mlflow.entities import Param

    items = [Param(k, redact(str(v))[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return str(run.info.run_id)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    client = _client(uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, redact(str(v)))


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log a few metrics from the driver; an outage is a warning, never an error."""
    try:
        client = _client(uri)
        for k, v in metrics.items():
            client.log_metric(run_id, k, v, step=step)
    except Exception as exc:  # noqa: BLE001 - bookkeeping must not stop a run
        log.warning("could not log %s to MLflow at %s: %s", sorted(metrics), redact(uri), redact_exc(exc))


def log_png(client: Any, run_id: str, png: bytes, artifact_file: str) -> None:
    """Store PNG bytes as the run's artifact `artifact_file` (e.g. "figures/embeddings.png")."""
    folder, name = os.path.split(artifact_file)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(png)
        client.log_artifact(run_id, str(path), artifact_path=folder or None)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    try:
        _client(uri).set_terminated(run_id, status=status)
    except Exception as exc:  # noqa: BLE001 - bookkeeping must not turn a result into a failure
        log.warning("could not close MLflow run %s at %s: %s", run_id, redact(uri), redact_exc(exc))


# The fields that rebuild the encoder: never rewritten. The rest (lineage, user tags) is redacted before it is
# stored as encoder.json, model metadata and version tags.
_ARCHITECTURE = frozenset({"method", "backbone", "cifar_stem", "image_size", "patch_size", "backbone_kwargs", "mean",
                           "std"})


def _redacted_spec(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v if k in _ARCHITECTURE else json.loads(redact(json.dumps(v))) for k, v in spec.items()}


def register_encoder(uri: str, run_id: str, encoder: nn.Module, spec: dict[str, Any], name: str,
                     alias: str, full_dir: Path | None = None) -> str:
    """Log the encoder to the run, register it as `name` and point `alias` at it; returns the version.

    The model is logged as code (PYFUNC_CODE), so MLflow pickles nothing and loading it unpickles nothing.
    `full_dir` holding an exported whole method (`save_full_dir`) adds it to the same model version.
    """
    import mlflow
    import mlflow.pyfunc

    _guard(uri)
    mlflow.set_tracking_uri(uri)
    spec = _redacted_spec(spec)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "encoder"
        save_encoder_dir(folder, encoder, spec)
        artifacts = {"weights": str(folder / "encoder.safetensors"), "spec": str(folder / "encoder.json"),
                     "timm_config": str(folder / TIMM_CONFIG)}
        if full_dir is not None and (full_dir / FULL_WEIGHTS).exists():
            artifacts.update(full_weights=str(full_dir / FULL_WEIGHTS), full_config=str(full_dir / FULL_CONFIG))
        example = np.zeros((2, 3, spec["image_size"], spec["image_size"]), dtype=np.uint8)
        with redacted_errors((Exception,)), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="encoder",
                python_model=str(PYFUNC_CODE),
                artifacts=artifacts,
                registered_model_name=name,
                input_example=example,
                pip_requirements=["raysl", "torch", "timm", "safetensors"],
                metadata={"raysl": spec},
            )
    version = str(info.registered_model_version)
    client = _client(uri)
    client.set_registered_model_alias(name, alias, version)
    for k, v in spec.items():
        client.set_model_version_tag(name, version, k, redact(json.dumps(v) if not isinstance(v, str) else v))
    log.info("registered %s version %s as @%s", name, version, alias)
    return version


def _artifact_dir(model_uri: str, uri: str | None, filename: str, tmp: str) -> Path | None:
    """Download a model's artifacts into `tmp`; the folder holding `filename`, or None."""
    import mlflow
    import mlflow.artifacts

    _guard(tracking_uri(uri))
    mlflow.set_tracking_uri(tracking_uri(uri))
    with redacted_errors((Exception,)):  # MLflow's errors quote the request URL, userinfo included
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
    found = next(local.rglob(filename), None)
    return found.parent if found is not None else None


def registry_version(model_uri: str, uri: str | None = None) -> tuple[str | None, str | None]:
    """(logged model id, registered version) of `models:/<name>@<alias>` or `models:/<name>/<version>`;
    (None, None) for other URIs. A name, alias or version that does not exist is a ValueError that lists what
    the registry holds."""
    if not model_uri.startswith("models:/"):
        return None, None
    ref = model_uri[len("models:/") :]
    client = _client(tracking_uri(uri))
    try:
        if "@" in ref:
            mv = client.get_model_version_by_alias(*ref.split("@", 1))
        elif "/" in ref:
            mv = client.get_model_version(*ref.split("/", 1))
        else:
            return None, None
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own exception types for a missing entry
        raise ValueError(registry_help(client, ref, exc)) from None
    return getattr(mv, "model_id", None), str(mv.version)


def registry_help(client: Any, ref: str, exc: Exception) -> str:
    """What the registry holds, for an error about a model reference that does not resolve."""
    name = ref.split("@")[0].split("/")[0]
    try:
        names = sorted(m.name for m in client.search_registered_models(max_results=200))
    except Exception:  # noqa: BLE001 - the original error is what matters; the listing is a courtesy
        return redact(f"models:/{ref} not found ({redact_exc(exc)})")
    if name not in names:
        return f"models:/{ref}: no registered model {name!r}; registered models: {names or 'none'}"
    aliases = sorted(client.get_registered_model(name).aliases)
    return f"models:/{ref} not found; {name!r} has aliases {aliases or 'none'} ({type(exc).__name__})"


def download_full_dir(model_uri: str, uri: str | None, tmp: str) -> Path:
    """Download the whole method registered beside an encoder (`save_full_dir`) into `tmp`; its folder.
    Rebuilding it is the method layer's job (raysl.methods.export), not tracking's."""
    folder = _artifact_dir(model_uri, uri, FULL_CONFIG, tmp)
    if folder is None:
        raise ValueError(f"{redact(model_uri)} holds only an encoder, not a whole model (no {FULL_CONFIG}); "
                         "this needs a model registered whole, such as clip or a fine-tuned classifier")
    return folder


def load_encoder(model_uri: str, uri: str | None = None) -> tuple[nn.Module, dict[str, Any], str | None]:
    """Load `models:/<name>@<alias>` (or any model URI) → (encoder in eval mode, spec, model_id)."""
    registry_version(model_uri, uri)  # a missing name or alias fails here, listing what the registry holds
    with tempfile.TemporaryDirectory() as tmp:
        folder = _artifact_dir(model_uri, uri, "encoder.json", tmp)
        if folder is None:
            raise ValueError(f"{redact(model_uri)} holds no raysl encoder (no encoder.json among its artifacts)")
        model, spec = load_encoder_dir(folder)
    model_id, version = registry_version(model_uri, uri)
    if version is not None:
        spec["registered_version"] = version
    return model, spec, model_id
