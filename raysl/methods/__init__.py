"""Methods behind one contract (see base.py); importing this package registers them all."""

from raysl.methods import byol, clip, ijepa  # noqa: F401  (registers "byol", "clip", "ijepa")
from raysl.methods.base import Method, get_method, registered

__all__ = ["Method", "get_method", "registered"]
