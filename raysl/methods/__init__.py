"""Methods behind one contract (see base.py); importing this package registers them all."""

from raysl.methods import byol, ijepa  # noqa: F401  (registers "byol", "ijepa")
from raysl.methods.base import Method, get_method, registered

__all__ = ["Method", "get_method", "registered"]
