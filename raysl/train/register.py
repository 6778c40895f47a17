"""The end of a pretraining run: register the final checkpoint's encoder in MLflow and close the run.

MLflow may be down at that moment. Registration is retried for `tracking.retry_s`; if it still fails the
command exits non-zero (a scheduled job must not go on with last week's model), the run state records that
training is over, and the MLflow run is marked FAILED as soon as the server answers within the same budget.
A rerun of the same config then registers the finished checkpoint without training again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from raysl import tracking
from raysl.config import PretrainConfig
from raysl.methods.base import describe_encoder
from raysl.models.files import load_encoder_dir
from raysl.storage import redact
from raysl.train.errors import RegistrationError

log = logging.getLogger(__name__)
T = TypeVar("T")



def with_retry(what: str, fn: Callable[[], T], budget_s: float, first_wait_s: float = 1.0) -> T:
    """`fn()`, retried with doubling waits (capped at 10 s) until it succeeds or `budget_s` has passed."""
    deadline, wait = time.monotonic() + budget_s, first_wait_s
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - MLflow raises many types in an outage
            if time.monotonic() + wait > deadline:
                raise
            log.warning("%s failed (%s); retrying in %.0f s", what, redact(str(exc))[:200], wait)
            time.sleep(wait)
            wait = min(wait * 2, 10.0)


def _registered(uri: str, name: str, run_id: str) -> str | None:
    """The version this run already registered (a rerun after a crash between registering and recording it
    must not register a second copy)."""
    found = tracking.client(uri).search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if not found:
        return None
    version = str(min(int(v.version) for v in found))
    log.info("run %s already registered %s version %s; not registering again", run_id, name, version)
    return version


def register_checkpoint(cfg: PretrainConfig, uri: str, run_id: str, model_name: str, checkpoint_dir: Path,
                        tags: dict[str, str]) -> str:
    """Tag the run, register the checkpoint's encoder as `model_name@alias`, end the run FINISHED; the version.
    Retried while MLflow does not answer; RegistrationError after `tracking.retry_s`."""
    encoder, spec = load_encoder_dir(checkpoint_dir)
    spec.update(describe_encoder(cfg), source_run=run_id, **cfg.tracking.tags)

    def attempt() -> str:
        tracking.set_tags(uri, run_id, tags)
        version = (_registered(uri, model_name, run_id)
                   or tracking.register_encoder(uri, run_id, encoder, spec, model_name, cfg.tracking.alias,
                                                full_dir=checkpoint_dir))
        tracking.client(uri).set_terminated(run_id, status="FINISHED")
        return version

    try:
        return with_retry("registering the encoder in MLflow", attempt, cfg.tracking.retry_s)
    except Exception as exc:  # noqa: BLE001 - any failure here is reported the same way
        reason = redact(f"{type(exc).__name__}: {exc}")[:400]
    _mark_failed(uri, run_id, cfg.tracking.retry_s)
    raise RegistrationError(f"training finished but the encoder could not be registered in MLflow at "
                            f"{redact(uri)} ({reason}). The checkpoint is kept; run the same command again to "
                            "register it without training again")


def _mark_failed(uri: str, run_id: str, budget_s: float) -> None:
    def mark() -> Any:
        tracking.client(uri).set_terminated(run_id, status="FAILED")

    try:
        with_retry("marking the MLflow run FAILED", mark, budget_s)
    except Exception as exc:  # noqa: BLE001 - the exit code and the run state already say what happened
        log.warning("could not mark MLflow run %s FAILED (%s); a rerun registers it", run_id,
                    redact(str(exc))[:200])
