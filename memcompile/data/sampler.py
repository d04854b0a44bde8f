"""Plug coreset selection into a plain PyTorch training loop.

The DataLoader yields *large* batches (the pool, e.g. twice the batch you can afford to backprop);
``coreset_batches`` turns each into its coreset just before it is used, so the selection sees the
current model.

Example::

    selector = CoresetSelector(CoresetConfig(ratio=0.5))
    for batch in coreset_batches(loader, selector, model):
        loss, _ = weighted_causal_lm_loss(model, batch)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from torch import nn

from .coreset import CoresetSelector


def coreset_batches(
    loader: Iterable[Mapping[str, Any]], selector: CoresetSelector, model: nn.Module
) -> Iterator[dict[str, Any]]:
    """Yield the coreset of each large batch of ``loader`` (lazily, one step at a time)."""
    for batch in loader:
        yield selector.select(model, batch)
