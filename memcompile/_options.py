"""The checks every options dataclass uses (``MemtrainConfig`` and each compression method's section).

Each raises ``ValueError`` naming the key and what is valid, because a typo that silently falls back
to a default changes what gets trained.
"""
from __future__ import annotations

from typing import Any


def fail(key: str, value: Any, valid: str) -> None:
    raise ValueError(f"memtrain option {key!r}: got {value!r}; valid: {valid}")


def choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        fail(key, value, " | ".join(repr(c) for c in choices))


def int_at_least(key: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        fail(key, value, f"an int >= {low}")


def positive_float(key: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        fail(key, value, "a float > 0")


def patterns(key: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    value = tuple(value)
    if not value or not all(isinstance(v, str) and v for v in value):
        fail(key, value, "a non-empty string or list of non-empty module-name patterns, or None")
    return value


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _whole_bytes(key: str, value: Any, amount: float) -> int:
    # A value under a byte is a fraction written without a unit (0.5 meaning half), not a size.
    if amount < 1:
        fail(key, value, "at least one byte: a size such as '4.5GiB' or '800MB' (a bare number is bytes; for a "
             "fraction of the saved bytes, recompute_budget takes one)")
    return int(amount)


def byte_size(key: str, value: Any) -> int | None:
    """Bytes from an int or a string such as ``"4.5GiB"``, ``"800 MB"``; ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, bool):
        fail(key, value, "bytes as an int, or a string such as '4.5GiB' or '800MB'")
    if isinstance(value, (int, float)):
        if value <= 0:
            fail(key, value, "a positive number of bytes")
        return _whole_bytes(key, value, value)
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number):] or "b"
        try:
            amount = float(number)
        except ValueError:
            amount = -1.0
        if unit in _UNITS and amount > 0:
            return _whole_bytes(key, value, amount * _UNITS[unit])
    fail(key, value, "bytes as an int, or a string such as '4.5GiB' or '800MB' (units: B, KB, MB, GB, KiB, MiB, "
         "GiB)")
