"""Data tools: CoLM mini-batch coresets (select the part of a large batch worth backpropagating)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .budgets import BudgetPlan, plan_budgets, proportional_budgets
from .coreset import CoresetConfig, CoresetSelection, CoresetSelector, take_rows
from .facility_location import (
    cluster_sizes,
    facility_location_value,
    greedy_facility_location,
    l1_similarity,
)
from .features import AdamHistory, top_coordinates
from .losses import causal_lm_labels, per_example_causal_lm_loss, weighted_causal_lm_loss
from .sampler import coreset_batches
from .split_forward import ModelSplit, PrefixCache, default_block_name
from .zeroth_order import DirectionSampler, exact_gradients, zeroth_order_gradients

if TYPE_CHECKING:
    from .trainer import CoresetTrainer

__all__ = [
    "AdamHistory",
    "BudgetPlan",
    "CoresetConfig",
    "CoresetSelection",
    "CoresetSelector",
    "CoresetTrainer",
    "DirectionSampler",
    "ModelSplit",
    "PrefixCache",
    "causal_lm_labels",
    "cluster_sizes",
    "coreset_batches",
    "default_block_name",
    "exact_gradients",
    "facility_location_value",
    "greedy_facility_location",
    "l1_similarity",
    "per_example_causal_lm_loss",
    "plan_budgets",
    "proportional_budgets",
    "take_rows",
    "top_coordinates",
    "weighted_causal_lm_loss",
    "zeroth_order_gradients",
]


def __getattr__(name: str) -> Any:
    # Importing transformers.Trainer costs seconds; only pay it when the Trainer is used.
    if name == "CoresetTrainer":
        from .trainer import CoresetTrainer

        return CoresetTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
