"""Methods behind one contract (see base.py); importing this package registers them all."""

from raysl.methods import byol, classify, clip, detect, dino, dora, ijepa  # noqa: F401  (registers each method)
from raysl.methods.base import Method, get_method, registered

__all__ = ["Method", "get_method", "registered"]
