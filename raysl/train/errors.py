"""The ways a run stops that the `raysl` command reports as a message and an exit code, not a traceback.
Kept free of heavy imports, so the command can name them before torch and Ray are loaded."""

from __future__ import annotations


class RunStopped(RuntimeError):
    """The run stopped for a reason a retry would meet again (the message says which); not retried."""


class RunStateError(RuntimeError):
    """The run's state file exists but cannot be read; nothing is retrained or re-registered until it can."""


class RegistrationError(RuntimeError):
    """Training finished but its encoder could not be registered; rerunning the command registers it."""


class ClusterTooSmall(RuntimeError):
    """The workers asked for do not fit the cluster within the wait."""
