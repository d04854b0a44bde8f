"""Marks that the backend leaves on parameters, for optimizers and tools that must know them.

The activation-compression pass approximates the weight gradient of the layers it compresses.
Optimizers that need the exact full gradient (Fira's residual scaling) read this mark and refuse.
"""
from __future__ import annotations

import weakref

import torch

GRAD_APPROX_ATTR = "_memtrain_grad_approx"
# On an FSDP2-sharded parameter: its unsharded parameter, the one the compiled forward receives and
# the backend marks (weak: FSDP2 owns it).
UNSHARDED_ATTR = "_memtrain_unsharded"


def mark_grad_approximation(param: torch.Tensor, method: str) -> None:
    """Record that ``param.grad`` will be computed by an approximation (``"velora"``, ``"compact"``)."""
    setattr(param, GRAD_APPROX_ATTR, method)


def grad_approximation(param: torch.Tensor) -> str | None:
    """The approximation that computes ``param.grad``, or ``None`` when the gradient is exact. For an
    FSDP2-sharded parameter linked by ``link_unsharded``, the mark of its unsharded parameter."""
    method = getattr(param, GRAD_APPROX_ATTR, None)
    ref = getattr(param, UNSHARDED_ATTR, None)
    unsharded = None if ref is None else ref()
    return method if method is not None or unsharded is None else getattr(unsharded, GRAD_APPROX_ATTR, None)


def link_unsharded(model: torch.nn.Module) -> None:
    """Under FSDP2, let ``grad_approximation`` of each sharded parameter of ``model`` (those an optimizer
    holds) read the marks of the unsharded one the backend sees. Collective: call it on every process."""
    from memcompile.activation_state import forward_parameters

    sharded = dict(model.named_parameters(remove_duplicate=False))
    for name, unsharded in forward_parameters(model).items():
        if unsharded is not sharded[name]:
            setattr(sharded[name], UNSHARDED_ATTR, weakref.ref(unsharded))
