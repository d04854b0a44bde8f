"""CoLM mini-batch coresets: train on a subset of a large batch that matches its gradient.

Per selection step, for a pool of ``n`` examples with source labels:

1. Keep every example of the small sources; split the rest of the budget over the large sources in
   proportion to their size (``budgets.plan_budgets``).
2. Per-example gradients of one small parameter block (default: the last layer's ``v_proj`` LoRA B),
   by a zeroth-order estimate (``zeroth_order``) with the model in ``eval()``.
3. Adam-normalise them with the selector's own history, keep the top-``k`` coordinates of each
   source by ``|mean|`` (``features``).
4. Per source, greedy facility location on L1 similarities picks the budgeted examples
   (``facility_location``).

Example::

    selector = CoresetSelector(CoresetConfig(ratio=0.5))
    for big in loader:                      # batches of 2b examples with a "sources" column
        sub = selector.select(model, big)   # b examples plus "coreset_weights"
        loss, _ = weighted_causal_lm_loss(model, sub)
        loss.backward(); opt.step(); opt.zero_grad()
"""
from __future__ import annotations

import logging
from collections.abc import Hashable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .budgets import plan_budgets
from .facility_location import cluster_sizes, greedy_facility_location, l1_similarity
from .features import AdamHistory, top_coordinates
from .losses import causal_lm_labels
from .split_forward import ModelSplit, default_block_name
from .zeroth_order import DirectionSampler, exact_gradients, zeroth_order_gradients

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoresetConfig:
    """Settings of a ``CoresetSelector``.

    Args:
        size: examples per coreset; ``None`` uses ``ratio``. Clamped to the pool size.
        ratio: coreset size as a fraction of the pool (``floor``, at least 1) when ``size`` is None.
        small_sources: explicit small source ids, always kept whole (the official ``keep_sources``).
        small_fraction: when ``small_sources`` is None, a source is small if it has fewer than
            ``small_fraction`` times the mean count per source in the pool; 0 keeps none.
        on_overflow: ``"subsample"`` (select among the small sources with proportional budgets,
            logged as a warning) or ``"raise"``, when the small sources exceed ``size``.
        param_name: the parameter block whose gradients are the features; ``None`` picks the last
            layer's ``self_attn.v_proj.lora_B`` of the active adapter. Give it for models without
            LoRA (e.g. ``"model.layers.3.self_attn.v_proj.weight"``).
        gradient: ``"zeroth_order"`` or ``"exact"`` (per-example autograd; tests, small models).
        eps: zeroth-order step.
        fixed_direction: draw ``z`` once and reuse it (the official code). Weakness: every
            zeroth-order gradient is then ``c_i z``, so after normalisation and top-k the selection
            only orders one scalar per example. Default: a fresh ``z`` per step.
        seed: seeds the direction generator; the sequence of directions is reproducible.
        topk: coordinates kept per source (clamped to the block size).
        adam_betas, adam_eps: the normalisation's moments (match the optimizer's).
        weighting: ``"uniform"`` or ``"cluster"`` (each pick weighted by how many of its source's
            examples it covers best; kept small-source examples weigh 1).
        chunk_size: examples per forward during selection (bounds the logits memory); None: all.
        source_key, labels_key, weight_key: batch keys.
        version: bumped when a default changes the selection.

    Example::

        # The official MathInstruct recipe: pool 128, keep sources 0,1,3,5,7,8,9,10,11,13, select 64.
        CoresetConfig(size=64, small_sources=(0, 1, 3, 5, 7, 8, 9, 10, 11, 13), fixed_direction=True)
    """

    size: int | None = None
    ratio: float = 0.5
    small_sources: tuple[Hashable, ...] | None = None
    small_fraction: float = 1.0
    on_overflow: str = "subsample"
    param_name: str | None = None
    gradient: str = "zeroth_order"
    eps: float = 1e-3
    fixed_direction: bool = False
    seed: int = 0
    topk: int = 2560
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weighting: str = "uniform"
    chunk_size: int | None = 16
    source_key: str = "sources"
    labels_key: str = "labels"
    weight_key: str = "coreset_weights"
    version: int = 1

    def __post_init__(self):
        if self.size is not None and self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.on_overflow not in ("subsample", "raise"):
            raise ValueError(f"on_overflow must be 'subsample' or 'raise', got {self.on_overflow!r}")
        if self.gradient not in ("zeroth_order", "exact"):
            raise ValueError(f"gradient must be 'zeroth_order' or 'exact', got {self.gradient!r}")
        if self.weighting not in ("uniform", "cluster"):
            raise ValueError(f"weighting must be 'uniform' or 'cluster', got {self.weighting!r}")
        if self.eps <= 0 or self.topk < 1:
            raise ValueError("eps and topk must be positive")
        if self.small_sources is not None:
            object.__setattr__(self, "small_sources", tuple(self.small_sources))

    def size_for(self, n: int) -> int:
        if self.size is not None:
            return min(self.size, n)
        return max(1, int(self.ratio * n))


@dataclass(frozen=True)
class CoresetSelection:
    """One selection step.

    Args:
        indices: selected pool rows, ascending.
        weights: one weight per selected row (float32).
        budgets: picks per source reduced by facility location.
        small_sources: sources treated as small.
        direction: the zeroth-order ``z`` of this step (None when nothing needed features).
    """

    indices: torch.Tensor
    weights: torch.Tensor
    budgets: dict[Hashable, int]
    small_sources: tuple[Hashable, ...]
    direction: torch.Tensor | None


def take_rows(batch: Mapping[str, Any], indices: torch.Tensor, n: int) -> dict[str, Any]:
    """The rows ``indices`` of every tensor or list in ``batch`` with ``n`` rows; others as is."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            out[key] = value[indices.to(value.device)]
        elif isinstance(value, (list, tuple)) and len(value) == n:
            out[key] = [value[i] for i in indices.tolist()]
        else:
            out[key] = value
    return out


def _source_list(batch: Mapping[str, Any], key: str) -> list[Hashable]:
    if key not in batch:
        raise KeyError(
            f"batch has no {key!r} column; with the Hugging Face Trainer set remove_unused_columns=False"
        )
    sources = batch[key]
    return sources.tolist() if isinstance(sources, torch.Tensor) else list(sources)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` inside; every submodule's own train/eval flag restored on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


class CoresetSelector:
    """Selects CoLM coresets from large batches; keeps the Adam history and direction generator.

    Use one selector per training run: its normalisation history and generator advance with every
    ``select`` call. ``state_dict``/``load_state_dict`` carry them across a checkpoint.
    """

    def __init__(self, config: CoresetConfig | None = None):
        self.config = config or CoresetConfig()
        self.history = AdamHistory(self.config.adam_betas, self.config.adam_eps)
        self.directions = DirectionSampler(self.config.seed, self.config.fixed_direction)
        self._split: ModelSplit | None = None

    def _split_for(self, model: nn.Module) -> ModelSplit:
        if self._split is None or self._split.model is not model:
            name = self.config.param_name or default_block_name(model)
            self._split = ModelSplit(model, name)
        return self._split

    def select_indices(self, model: nn.Module, batch: Mapping[str, Any]) -> CoresetSelection:
        """Choose the coreset rows of ``batch`` (a dict with ``input_ids`` and a source column)."""
        cfg = self.config
        sources = _source_list(batch, cfg.source_key)
        n = len(sources)
        plan = plan_budgets(
            sources,
            cfg.size_for(n),
            small_sources=cfg.small_sources,
            small_fraction=cfg.small_fraction,
            on_overflow=cfg.on_overflow,
        )
        picked = {i: 1.0 for i in plan.kept}
        direction = None
        if plan.budgets:
            split = self._split_for(model)
            groups = {s: [i for i, src in enumerate(sources) if src == s] for s in plan.budgets}
            rows = torch.tensor([i for g in groups.values() for i in g])
            with _eval_mode(model):
                grads, direction = self._gradients(split, batch, rows, n)
            offset, chosen = 0, []
            for source, members in groups.items():
                # Normalise one source at a time: the dense (rows, numel) features are the peak.
                part = self.history.normalise(grads[offset : offset + len(members)])
                part = part[:, top_coordinates(part, cfg.topk)]
                sim = l1_similarity(part)
                order, _ = greedy_facility_location(sim, plan.budgets[source])
                sizes = cluster_sizes(sim, order.to(sim.device)).tolist() if cfg.weighting == "cluster" else None
                for rank, local in enumerate(order.tolist()):
                    picked[members[local]] = 1.0 if sizes is None else sizes[rank]
                chosen.extend(offset + j for j in order.tolist())
                offset += len(members)
            self.history.update(grads[chosen])
        logger.debug("coreset: kept %d small-source rows, budgets %s", len(plan.kept), plan.budgets)
        indices = torch.tensor(sorted(picked), dtype=torch.long)
        weights = torch.tensor([picked[i] for i in indices.tolist()], dtype=torch.float32)
        return CoresetSelection(indices, weights, plan.budgets, plan.small_sources, direction)

    def _gradients(
        self, split: ModelSplit, batch: Mapping[str, Any], rows: torch.Tensor, n: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cfg = self.config
        device = split.param.device
        sub = take_rows(batch, rows, n)
        labels = causal_lm_labels(sub, cfg.labels_key).to(device)
        skip = {cfg.source_key, cfg.labels_key, cfg.weight_key}
        inputs = {k: v.to(device) for k, v in sub.items() if k not in skip and isinstance(v, torch.Tensor)}
        if cfg.gradient == "exact":
            return exact_gradients(split, inputs, labels, chunk_size=cfg.chunk_size), None
        z = self.directions(split.param)
        grads = zeroth_order_gradients(split, inputs, labels, z, eps=cfg.eps, chunk_size=cfg.chunk_size)
        return grads, z

    def select(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The coreset rows of ``batch``, with their weights under ``config.weight_key``."""
        selection = self.select_indices(model, batch)
        n = len(_source_list(batch, self.config.source_key))
        sub = take_rows(batch, selection.indices, n)
        device = next((v.device for v in sub.values() if isinstance(v, torch.Tensor)), None)
        sub[self.config.weight_key] = selection.weights.to(device)
        return sub

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.state_dict(), "directions": self.directions.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | str = "cpu") -> None:
        self.history.load_state_dict(state["history"])
        self.directions.load_state_dict(state["directions"], device)
