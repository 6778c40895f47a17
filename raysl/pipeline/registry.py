"""The registry side of a pipeline: who is @champion, where its checkpoint is, moving the alias, tagging."""

from __future__ import annotations

import logging
from typing import Any

from raysl import tracking

log = logging.getLogger(__name__)
CHAMPION = "champion"
CANDIDATE = "candidate"


def alias_version(uri: str, name: str, alias: str = CHAMPION) -> str | None:
    """The version `name@alias` points at, or None when the model or the alias does not exist yet."""
    client = tracking.client(uri)
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own types for "no such model/alias"
        if "RESOURCE_DOES_NOT_EXIST" in str(exc) or "not found" in str(exc).lower() or "alias" in str(exc).lower():
            return None
        raise


def checkpoint_of(uri: str, name: str, version: str) -> str | None:
    """The checkpoint folder the version was registered from (its training run's `raysl.checkpoint_uri`)."""
    client = tracking.client(uri)
    mv = client.get_model_version(name, version)
    run_id = mv.run_id or mv.tags.get("source_run")
    if not run_id:
        return None
    tags: dict[str, Any] = client.get_run(run_id).data.tags
    return tags.get("raysl.checkpoint_uri")


def tag_version(uri: str, name: str, version: str, tags: dict[str, str]) -> None:
    client = tracking.client(uri)
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)


def promote(uri: str, name: str, version: str) -> bool:
    """Point @champion at `version`; False when it already did (a rerun moves nothing)."""
    if alias_version(uri, name) == version:
        return False
    tracking.client(uri).set_registered_model_alias(name, CHAMPION, version)
    return True
