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
