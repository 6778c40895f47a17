"""Checkpoint folders: full training state (torch.save of tensors and plain types only, so it loads with
weights_only=True) plus the encoder alone as safetensors + JSON spec, ready to register."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from raysl import storage
from raysl.models.files import save_encoder_dir, save_full_dir
from raysl.storage import S3Settings

STATE_FILE = "state.pt"


def save_checkpoint(folder: Path, *, method: nn.Module, encoder: nn.Module, spec: dict[str, Any],
                    optimizer: torch.optim.Optimizer, scheduler: Any, step: int,
                    counters: dict[str, int], full_config: dict[str, Any] | None = None,
                    data_position: list[list[int]] | None = None) -> None:
    """`full_config` set: also export the whole method (weights + the config that rebuilds it).
    `data_position`: each worker's [epoch, batches taken], so a restart resumes the stream where it was."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "model": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "counters": dict(counters),
        "data_position": data_position or [],
    }
    torch.save(state, folder / STATE_FILE)
    save_encoder_dir(folder, encoder, spec)
    if full_config is not None:
        save_full_dir(folder, method, full_config)


class CheckpointRefused(ValueError):
    """A checkpoint file that is not plain tensors and types (a pickle that would run code, say)."""


def _load(source: Any, where: str) -> dict[str, Any]:
    # weights_only=True: PyTorch's restricted unpickler builds tensors and plain containers only; anything
    # else in the file (a class, a call such as os.system) is refused before it runs.
    try:
        state: dict[str, Any] = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = storage.redact(str(exc).strip().splitlines()[0][:300]) if str(exc).strip() else type(exc).__name__
        raise CheckpointRefused(f"checkpoint {where} refused: it holds more than tensors and plain types, and raysl "
                                f"never unpickles code ({first}); delete that checkpoint folder to resume from an "
                                "earlier one") from None
    return state


def load_checkpoint(folder: Path) -> dict[str, Any]:
    return _load(folder / STATE_FILE, f"{STATE_FILE} of {folder.name}")


def read_model_state(uri: str, s3: S3Settings | None = None) -> dict[str, torch.Tensor]:
    """The method weights of the checkpoint folder `uri` (local or s3://), for a warm start."""
    try:
        data = storage.read_bytes(f"{uri.rstrip('/')}/{STATE_FILE}", s3)
    except (FileNotFoundError, OSError) as exc:
        raise FileNotFoundError(f"train.init_from: no {STATE_FILE} under {storage.redact(uri)} "
                                f"({storage.redact_exc(exc)})") from None
    return dict(_load(io.BytesIO(data), storage.redact(uri))["model"])


def warm_start(method: nn.Module, model_state: dict[str, torch.Tensor], source: str) -> None:
    """Load a checkpoint's method weights; a checkpoint of another architecture is a clear error."""
    try:
        method.load_state_dict(model_state)
    except RuntimeError as exc:
        head = storage.redact(str(exc)).splitlines()[0:3]
        raise ValueError(f"train.init_from={source}: the checkpoint does not fit this config's model "
                         f"({' '.join(head)[:400]})") from None


def restore_state(state: dict[str, Any], *, method: nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: Any) -> int:
    """Load model, optimizer and scheduler state in place; returns the step the checkpoint was taken at."""
    method.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])
