"""Compression methods of the activation-compression pass, one file each, registered by name.

Adding a method is one file here (see ``velora.py``) plus its tests: importing this package imports
every module in the folder, and each registers its ``CompressionMethod``.
"""
from __future__ import annotations

import importlib
import pkgutil

from .method import DEFAULT_EXCLUDE, METHODS, Compression, CompressionMethod, Group, register

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "method":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["DEFAULT_EXCLUDE", "METHODS", "Compression", "CompressionMethod", "Group", "register"]
