import logging
from collections import Counter

import pytest
import torch

from memcompile.data import (
    CoresetConfig,
    CoresetSelector,
    greedy_facility_location,
    l1_similarity,
    proportional_budgets,
)

LORA_BLOCK = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"
# Sizes 10, 6, 3, 2, 1 (mean 4.4): sources 2, 3, 4 are small.
SOURCES = [0] * 10 + [1] * 6 + [2] * 3 + [3] * 2 + [4]


def picked_per_source(selection, sources):
    return Counter(sources[i] for i in selection.indices.tolist())


def test_small_sources_kept_and_budgets_add_up(make_llama, make_pool):
    model = make_llama(dtype=torch.float32, lora=True)
    selector = CoresetSelector(CoresetConfig(ratio=0.5, topk=16))
    sel = selector.select_indices(model, make_pool(SOURCES))
    per_source = picked_per_source(sel, SOURCES)
    assert len(sel.indices) == 11 and len(set(sel.indices.tolist())) == 11
    assert sel.small_sources == (2, 3, 4)
    assert per_source[2] == 3 and per_source[3] == 2 and per_source[4] == 1
    # The other 5 split 10:6 -> floors 3, 1 -> +1 to the smaller.
    assert sel.budgets == {0: 3, 1: 2} and per_source[0] == 3 and per_source[1] == 2
    assert torch.equal(sel.weights, torch.ones(11))


def test_exact_selection_matches_reference_pipeline(make_llama, make_pool, reference_gradients):
    model = make_llama(lora=True).eval()
    pool = make_pool(SOURCES, seed=4)
    cfg = CoresetConfig(ratio=0.5, gradient="exact", topk=8, adam_eps=1e-8)
    selector = CoresetSelector(cfg)
    sel = selector.select_indices(model, pool)

    param = dict(model.named_parameters())[LORA_BLOCK]
    grads = reference_gradients(model, param, pool)
    # First step, empty history: the Adam feature is g / (|g| + eps).
    features = grads / (grads.abs() + 1e-8)
    chosen = []
    for source, budget in sel.budgets.items():
        rows = [i for i, s in enumerate(SOURCES) if s == source]
        f = features[rows]
        f = f[:, f.mean(0).abs().argsort(descending=True)[:8]]
        picks, _ = greedy_facility_location(l1_similarity(f), budget, lazy=False)
        chosen += [rows[j] for j in picks.tolist()]
    expected = sorted(chosen + [i for i, s in enumerate(SOURCES) if s in (2, 3, 4)])
    assert sel.indices.tolist() == expected
    # History: mean first moment of the selected large-source examples.
    torch.testing.assert_close(selector.history.m, 0.1 * grads[chosen].mean(0), rtol=1e-5, atol=1e-9)
    assert selector.history.step == 1


def _parallel(a, b):
    cos = torch.nn.functional.cosine_similarity(a.reshape(-1), b.reshape(-1), dim=0).abs().item()
    return cos > 1 - 1e-6


@pytest.mark.parametrize("fixed", [False, True])
def test_fresh_and_fixed_directions(make_llama, make_pool, fixed):
    model = make_llama(dtype=torch.float32, lora=True)
    pool = make_pool(SOURCES)
    selector = CoresetSelector(CoresetConfig(ratio=0.5, fixed_direction=fixed, seed=3))
    first = selector.select_indices(model, pool)
    m_after_one = selector.history.m.clone()
    second = selector.select_indices(model, pool)
    assert torch.equal(first.direction, second.direction) == fixed
    # Every zeroth-order gradient is c_i z, so the history lies on z.
    assert _parallel(m_after_one, first.direction)
    # With one fixed z it stays on that line forever; fresh directions leave it.
    assert _parallel(selector.history.m, first.direction) == fixed


def test_selection_reproducible_and_model_state_restored(make_llama, make_pool):
    model = make_llama(dtype=torch.float32, lora=True, dropout=0.3)
    model.train()
    model.base_model.model.lm_head.eval()  # a submodule in its own mode must stay so
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: m.training for n, m in model.named_modules()}
    pools = [make_pool(SOURCES, seed=s) for s in range(3)]
    runs = []
    for _ in range(2):
        selector = CoresetSelector(CoresetConfig(ratio=0.5, seed=11))
        runs.append([selector.select_indices(model, p).indices.tolist() for p in pools])
        torch.rand(5)  # disturb the global RNG: dropout would make runs differ if it were active
    assert runs[0] == runs[1]
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_overflowing_small_sources_are_subsampled(make_llama, make_pool, caplog):
    model = make_llama(dtype=torch.float32, lora=True)
    selector = CoresetSelector(CoresetConfig(size=6, small_sources=(1, 2, 3)))
    with caplog.at_level(logging.WARNING, logger="memcompile.data.budgets"):
        sel = selector.select_indices(model, make_pool(SOURCES))
    assert "more than the coreset size" in caplog.text
    per_source = picked_per_source(sel, SOURCES)
    assert len(sel.indices) == 6 and per_source[0] == 0
    assert [per_source[s] for s in (1, 2, 3)] == proportional_budgets([6, 3, 2], 6)
    with pytest.raises(ValueError):
        CoresetSelector(CoresetConfig(size=6, small_sources=(1, 2, 3), on_overflow="raise")).select_indices(
            model, make_pool(SOURCES)
        )


def test_cluster_weights_cover_each_source(make_llama, make_pool):
    model = make_llama(dtype=torch.float32, lora=True)
    sel = CoresetSelector(CoresetConfig(ratio=0.5, weighting="cluster")).select_indices(model, make_pool(SOURCES))
    totals = Counter()
    for i, w in zip(sel.indices.tolist(), sel.weights.tolist()):
        totals[SOURCES[i]] += w
    assert totals == Counter({0: 10, 1: 6, 2: 3, 3: 2, 4: 1})


def test_model_without_lora_and_pool_without_large_sources(make_llama, make_pool):
    model = make_llama(dtype=torch.float32)
    cfg = CoresetConfig(size=5, param_name="model.layers.1.self_attn.v_proj.weight")
    sel = CoresetSelector(cfg).select_indices(model, make_pool(SOURCES))
    assert len(sel.indices) == 5 and sel.direction.shape == (16, 32)
    with pytest.raises(ValueError, match="param_name"):
        CoresetSelector(CoresetConfig(size=5)).select_indices(model, make_pool(SOURCES))
    # Everything fits: no features, no direction drawn, history untouched.
    selector = CoresetSelector(cfg)
    sel = selector.select_indices(model, make_pool([0, 1, 2]))
    assert sel.indices.tolist() == [0, 1, 2] and sel.direction is None and selector.history.step == 0


def test_select_returns_sub_batch_with_weights(make_llama, make_pool):
    model = make_llama(dtype=torch.float32, lora=True)
    pool = make_pool(SOURCES)
    pool["names"] = [f"row{i}" for i in range(len(SOURCES))]
    selector = CoresetSelector(CoresetConfig(ratio=0.5, seed=5))
    sub = selector.select(model, pool)
    idx = CoresetSelector(CoresetConfig(ratio=0.5, seed=5)).select_indices(model, pool).indices
    assert torch.equal(sub["input_ids"], pool["input_ids"][idx])
    assert sub["names"] == [f"row{i}" for i in idx.tolist()]
    assert torch.equal(sub["coreset_weights"], torch.ones(11))
    with pytest.raises(KeyError, match="remove_unused_columns"):
        selector.select(model, {k: v for k, v in pool.items() if k != "sources"})
