"""Per-source budgets of a mini-batch coreset (CoLM's source-wise selection).

Every example of a *small* source is kept; the rest of the budget goes to the *large* sources in
proportion to their size in the pool: ``b_q = floor((b - |S_s|) * |V_q| / (n - |S_s|))``, then +1 to
the smallest budgets (stable order) until the budgets add up to ``b``, as the official
``increase_array_to_threshold`` does.

Overflow rule: when the small sources alone hold more than ``b`` examples they cannot all be kept.
By default (``on_overflow="subsample"``) the budget is then spent on the small sources only, split
proportionally with the same rule, and each of them is reduced by facility location like a large
source; large sources get nothing that step. ``on_overflow="raise"`` raises instead.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)


def proportional_budgets(counts: Sequence[int], total: int) -> list[int]:
    """Split ``total`` over groups of sizes ``counts`` in proportion to their size.

    Floors first, then adds 1 to the smallest budgets (ties by position) until the sum is ``total``.
    Each budget stays within its group's size because ``total <= sum(counts)``.
    """
    pool = sum(counts)
    if not 0 <= total <= pool:
        raise ValueError(f"cannot pick {total} examples from {pool}")
    if total == 0:
        return [0] * len(counts)
    # Integer arithmetic: float products could floor 6.9999 to 6 and change the result.
    budgets = [total * c // pool for c in counts]
    order = sorted(range(len(counts)), key=lambda i: budgets[i])
    missing = total - sum(budgets)
    # The remainders sum to less than one per group, so each group gets at most one extra.
    for i in order[:missing]:
        budgets[i] += 1
    return budgets


@dataclass(frozen=True)
class BudgetPlan:
    """How a pool of ``n`` examples is split into a coreset of ``size``.

    Args:
        size: the coreset size (sum of ``budgets`` plus ``len(kept)``).
        small_sources: the sources treated as small this step.
        kept: pool indices kept without selection (every example of every fully kept source).
        budgets: for each source reduced by facility location, how many of its examples to pick.
        overflow: whether the small sources alone exceeded ``size``.
    """

    size: int
    small_sources: tuple[Hashable, ...]
    kept: tuple[int, ...]
    budgets: dict[Hashable, int]
    overflow: bool


def plan_budgets(
    sources: Sequence[Hashable],
    size: int,
    *,
    small_sources: Sequence[Hashable] | None = None,
    small_fraction: float = 1.0,
    on_overflow: str = "subsample",
) -> BudgetPlan:
    """Decide which examples are kept and how many each large source contributes.

    Args:
        sources: the source label of every pool example.
        size: the requested coreset size, at most ``len(sources)``.
        small_sources: explicit small source ids (the official ``keep_sources``). When ``None``, a
            source is small if it has fewer than ``small_fraction * n / n_sources`` examples in the
            pool (fraction 1.0: below the mean count per source).
        small_fraction: see ``small_sources``; 0 disables keeping small sources.
        on_overflow: ``"subsample"`` or ``"raise"`` when the small sources exceed ``size``.
    """
    n = len(sources)
    if not 0 <= size <= n:
        raise ValueError(f"coreset size {size} outside [0, {n}]")
    counts = Counter(sources)
    ids = _sorted_ids(counts)
    if small_sources is None:
        threshold = small_fraction * n / len(ids) if ids else 0.0
        small = [s for s in ids if counts[s] < threshold]
    else:
        wanted = set(small_sources)
        small = [s for s in ids if s in wanted]
    small_set = set(small)
    n_small = sum(counts[s] for s in small)

    overflow = n_small > size
    if overflow:
        if on_overflow == "raise":
            raise ValueError(
                f"small sources hold {n_small} examples, more than the coreset size {size}"
            )
        if on_overflow != "subsample":
            raise ValueError(f"on_overflow must be 'subsample' or 'raise', got {on_overflow!r}")
        logger.warning(
            "small sources hold %d examples, more than the coreset size %d: "
            "selecting among small sources only, with proportional budgets",
            n_small,
            size,
        )
        groups, total = small, size
    else:
        groups, total = [s for s in ids if s not in small_set], size - n_small

    split = dict(zip(groups, proportional_budgets([counts[s] for s in groups], total)))
    whole = set() if overflow else set(small)
    # A source whose budget covers all of it needs no selection.
    whole |= {s for s, b in split.items() if b == counts[s]}
    budgets = {s: b for s, b in split.items() if 0 < b < counts[s]}
    kept = tuple(i for i, s in enumerate(sources) if s in whole)
    return BudgetPlan(
        size=size,
        small_sources=tuple(small),
        kept=kept,
        budgets=budgets,
        overflow=overflow,
    )


def _sorted_ids(ids) -> list[Hashable]:
    try:
        return sorted(ids)
    except TypeError:
        # Mixed label types (ints and strings) have no natural order; any fixed one will do.
        return sorted(ids, key=repr)
