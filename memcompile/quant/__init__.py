"""Quantised frozen bases behind one interface (``base.py``); each format a folder (``nf4/``), loaded
on first use."""
from memcompile.quant.base import QuantCall, QuantizedLinear, QuantScheme, for_op, get, names, register, schemes

__all__ = ["QuantCall", "QuantScheme", "QuantizedLinear", "for_op", "get", "names", "register", "schemes"]
