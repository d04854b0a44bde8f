"""A Hugging Face ``Trainer`` that backprops the coreset of every large batch.

``per_device_train_batch_size`` is the pool size; each ``training_step`` selects the coreset from the
pool, then runs the usual step on it with the weighted per-example loss. The dataset needs a source
column (``CoresetConfig.source_key``); with a ``datasets.Dataset`` set
``remove_unused_columns=False`` so the Trainer keeps it.

Example::

    trainer = CoresetTrainer(
        model=model, args=TrainingArguments(..., per_device_train_batch_size=128,
                                            remove_unused_columns=False),
        train_dataset=ds, coreset=CoresetConfig(ratio=0.5),
    )
    trainer.train()
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer

from .coreset import CoresetConfig, CoresetSelector
from .losses import weighted_causal_lm_loss


class CoresetTrainer(Trainer):
    """``Trainer`` whose training steps use CoLM coresets of the incoming batches.

    Args:
        coreset: a ``CoresetSelector`` (to share or inspect its state), a ``CoresetConfig``, or
            None for the defaults.
        *args, **kwargs: passed to ``Trainer``.
    """

    # compute_loss returns a per-batch mean, so the Trainer divides by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, coreset: CoresetSelector | CoresetConfig | None = None, **kwargs: Any):
        from memcompile.trainer import MemtrainCallback, check_training_args

        check_training_args(kwargs.get("args", args[1] if len(args) > 1 else None))
        super().__init__(*args, **kwargs)
        self.selector = coreset if isinstance(coreset, CoresetSelector) else CoresetSelector(coreset)
        # The selector's history and directions go into the checkpoints, with the compression state.
        self.add_callback(MemtrainCallback(coreset=self.selector))

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        # num_items_in_batch counts the pool's tokens, not the coreset's: drop it.
        subset = self.selector.select(self.accelerator.unwrap_model(model), inputs)
        return super().training_step(model, subset, None)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        cfg = self.selector.config
        loss, outputs = weighted_causal_lm_loss(
            model, inputs, weight_key=cfg.weight_key, source_key=cfg.source_key, labels_key=cfg.labels_key
        )
        return (loss, outputs) if return_outputs else loss
