"""Marks that the backend leaves on parameters, for optimizers and tools that must know them.

The activation-compression pass approximates the weight gradient of the layers it compresses.
Optimizers that need the exact full gradient (Fira's residual scaling) read this mark and refuse.
"""
from __future__ import annotations

import torch

GRAD_APPROX_ATTR = "_memtrain_grad_approx"


def mark_grad_approximation(param: torch.Tensor, method: str) -> None:
    """Record that ``param.grad`` will be computed by an approximation (``"velora"``, ``"compact"``)."""
    setattr(param, GRAD_APPROX_ATTR, method)


def grad_approximation(param: torch.Tensor) -> str | None:
    """The approximation that computes ``param.grad``, or ``None`` when the gradient is exact."""
    return getattr(param, GRAD_APPROX_ATTR, None)
