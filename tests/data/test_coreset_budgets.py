import logging
import math
import random
from collections import Counter

import numpy as np
import pytest

from memcompile.data import plan_budgets, proportional_budgets


def official_budgets(counts, total):
    """The official recipe: floor of the proportional share, then ``increase_array_to_threshold``."""
    pool = sum(counts)
    arr = np.array([math.floor(total * c / pool) for c in counts])
    order = np.argsort(arr, kind="stable")
    for i in range(total - arr.sum()):
        arr[order[i % len(arr)]] += 1
    return arr.tolist()


def test_hand_computed_budgets():
    assert proportional_budgets([50, 30, 20], 10) == [5, 3, 2]
    # floors 2, 2, 1 sum to 5: the one left over goes to the smallest budget.
    assert proportional_budgets([7, 5, 3], 6) == [2, 2, 2]
    assert proportional_budgets([4, 4], 0) == [0, 0]
    with pytest.raises(ValueError):
        proportional_budgets([3, 2], 6)


def test_budgets_match_official_rule_and_add_up():
    rng = random.Random(0)
    for _ in range(300):
        counts = [rng.randint(1, 40) for _ in range(rng.randint(1, 7))]
        total = rng.randint(0, sum(counts))
        budgets = proportional_budgets(counts, total)
        assert budgets == official_budgets(counts, total)
        assert sum(budgets) == total
        for b, c in zip(budgets, counts):
            assert 0 <= b <= c
            # The +1 goes to the smallest budget, not the largest remainder: within 1, not below.
            assert abs(b - total * c / sum(counts)) <= 1


def test_small_sources_kept_and_large_budgets_follow_formula():
    rng = random.Random(1)
    for _ in range(100):
        sizes = {s: rng.choice([1, 2, 3, 10, 20, 40]) for s in range(rng.randint(2, 6))}
        sources = [s for s, c in sizes.items() for _ in range(c)]
        rng.shuffle(sources)
        n = len(sources)
        size = rng.randint(1, n)
        mean = n / len(sizes)
        small = {s for s, c in sizes.items() if c < mean}
        n_small = sum(sizes[s] for s in small)
        if n_small > size:
            continue
        plan = plan_budgets(sources, size)
        assert set(plan.small_sources) == small
        kept = Counter(sources[i] for i in plan.kept)
        for s in small:
            assert kept[s] == sizes[s], "every example of a small source is kept"
        large = sorted(set(sizes) - small)
        expected = official_budgets([sizes[s] for s in large], size - n_small)
        for s, b in zip(large, expected):
            # b_q = floor((b - |S_s|) |V_q| / (n - |S_s|)), +1 to the smallest; a full budget means "keep all".
            got = plan.budgets.get(s, kept[s])
            assert got == b
        assert len(plan.kept) + sum(plan.budgets.values()) == size


def test_explicit_small_sources_and_fraction():
    sources = [0] * 10 + [1] * 10 + [2] * 2
    plan = plan_budgets(sources, 12, small_sources=[1])
    assert plan.small_sources == (1,) and not plan.overflow
    assert sorted(plan.kept) == list(range(10, 20))
    # The other 2 split over sources 0 and 2 by size: floors 1 and 0, the extra goes to source 2.
    assert plan.budgets == {0: 1, 2: 1}
    # By mean count (22 / 3) source 2 is the small one.
    assert plan_budgets(sources, 12).small_sources == (2,)
    assert plan_budgets(sources, 12, small_fraction=0.0).small_sources == ()


def test_overflow_subsamples_small_sources_with_warning(caplog):
    sources = [0] * 4 + [1] * 4 + [2] * 4 + [3] * 30
    with caplog.at_level(logging.WARNING, logger="memcompile.data.budgets"):
        plan = plan_budgets(sources, 6)
    assert plan.overflow and set(plan.small_sources) == {0, 1, 2}
    assert "more than the coreset size" in caplog.text
    assert plan.kept == ()
    assert plan.budgets == {0: 2, 1: 2, 2: 2}, "large sources get nothing, small ones split the budget"
    with pytest.raises(ValueError, match="more than the coreset size"):
        plan_budgets(sources, 6, on_overflow="raise")
