"""Quantised frozen bases behind one interface (``base.py``); each format a folder, registered here."""
from memcompile.quant import nf4  # noqa: F401  (registers "nf4")
from memcompile.quant.base import QuantCall, QuantizedLinear, QuantScheme, for_op, get, names, register, schemes

__all__ = ["QuantCall", "QuantScheme", "QuantizedLinear", "for_op", "get", "names", "register", "schemes"]
