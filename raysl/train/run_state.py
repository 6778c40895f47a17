"""A run's bookkeeping beside its checkpoints (`<storage>/<run name>/raysl-run.json`): the MLflow run id, and
once training is over the checkpoint, the registered version and the final metrics.

Written whole and atomically (storage.write_bytes), so a crash never leaves half a file. Read strictly: a file
that is absent means "no earlier run"; a file that cannot be read or parsed stops the run with its path,
because taking it for "absent" would retrain and re-register a finished run after one storage hiccup.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.fs as pafs

from raysl import storage
from raysl.storage import S3Settings, redact
from raysl.train.errors import RunStateError

STATE_NAME = "raysl-run.json"




@dataclass
class RunState:
    mlflow_run_id: str | None = None
    trained: bool = False  # training reached its last step; `checkpoint` holds the final weights
    complete: bool = False  # trained and registered
    checkpoint: str | None = None
    model_version: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def state_uri(storage_path: str, name: str) -> str:
    return f"{storage_path.rstrip('/')}/{name}/{STATE_NAME}"


def read_state(uri: str, s3: S3Settings) -> RunState | None:
    """The state at `uri`; None when there is none."""
    fs, path = storage.resolve(uri, s3)
    try:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        raw = storage.read_bytes(uri, s3)
    except OSError as exc:
        raise RunStateError(f"run state {redact(uri)} cannot be read ({storage.redact(str(exc))[:300]}); "
                            "retry when storage answers") from None
    try:
        data = json.loads(raw)
        known = {k: v for k, v in dict(data).items() if k in RunState.__dataclass_fields__}
        return RunState(**known)
    except (ValueError, TypeError) as exc:
        raise RunStateError(f"run state {redact(uri)} is not valid JSON ({exc}); it was written by another tool "
                            "or damaged: delete it to start this run over, or restore it") from None


def write_state(uri: str, state: RunState, s3: S3Settings) -> None:
    storage.write_bytes(uri, json.dumps(asdict(state), indent=1).encode(), s3)
