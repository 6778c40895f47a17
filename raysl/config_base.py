"""The base of every config model: unknown keys are rejected, assignments validated; and the error type a
user can fix."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
