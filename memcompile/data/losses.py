"""Per-example causal-LM losses, and the weighted coreset loss built on them."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def causal_lm_labels(batch: Mapping[str, Any], labels_key: str = "labels") -> torch.Tensor:
    """``batch[labels_key]``, or ``input_ids`` with padding (``attention_mask == 0``) ignored."""
    if labels_key in batch:
        return batch[labels_key]
    labels = batch["input_ids"].clone()
    if "attention_mask" in batch:
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    return labels


def per_example_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of each row, over its non-ignored targets (0 if it has none).

    Computed in at least fp32 (fp64 logits stay fp64). For one row this equals the loss a Hugging
    Face causal LM returns for ``labels``.
    """
    logits = logits[:, :-1]
    targets = labels[:, 1:].to(logits.device)
    work = logits.to(torch.promote_types(logits.dtype, torch.float32))
    tokens = F.cross_entropy(
        work.reshape(-1, work.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)
    valid = (targets != IGNORE_INDEX).sum(dim=1)
    return tokens.sum(dim=1) / valid.clamp(min=1)


def weighted_causal_lm_loss(
    model: nn.Module,
    batch: Mapping[str, Any],
    *,
    weight_key: str = "coreset_weights",
    source_key: str | None = "sources",
    labels_key: str = "labels",
) -> tuple[torch.Tensor, Any]:
    """``sum_i w_i L_i / sum_i w_i`` over the rows of ``batch``; returns ``(loss, model outputs)``.

    ``L_i`` is the row's mean token loss. Weights default to uniform when ``batch`` has none (an
    evaluation batch). With uniform weights and rows of equal target length this is the usual
    token-mean loss.
    """
    skip = {weight_key, labels_key, source_key}
    inputs = {k: v for k, v in batch.items() if k not in skip}
    outputs = model(**inputs)
    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs.logits
    losses = per_example_causal_lm_loss(logits, causal_lm_labels(batch, labels_key))
    weights = batch.get(weight_key)
    if weights is None:
        return losses.mean(), outputs
    weights = weights.to(losses)
    return (weights * losses).sum() / weights.sum(), outputs
