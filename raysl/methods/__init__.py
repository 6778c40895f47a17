"""Methods behind one contract (see base.py); importing this package registers them all."""

from raysl.methods import byol  # noqa: F401  (registers "byol")
from raysl.methods.base import Method, get_method, registered

__all__ = ["Method", "get_method", "registered"]
