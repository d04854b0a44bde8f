"""Compiles that AOTAutograd's compile cache serves (the same graph compiled again, or a later process
with the same cache folder) skip memtrain's partitioner: their report, the marks on approximated
gradients and the passes' warnings come from what the compile that partitioned wrote."""
import os

import pytest
import torch

import memcompile
from memcompile import _torch_compat as tc
from memcompile import report_cache
from memcompile.marks import grad_approximation
from tests import models

OPTIONS = {"activation": "velora", "compiler": "inductor", "velora": {"num_groups": 8}}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))


def _train(options=OPTIONS, steps: int = 2):
    """A fresh model compiled anew (as a new process would): losses, gradients, its report, the model."""
    torch.compiler.reset()
    memcompile.clear_reports()
    model, ids = models.tiny_lora_llama(layers=1), models.batch()
    compiled = torch.compile(model, backend="memtrain", options=options)
    losses, grads = [], []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return losses, grads, memcompile.report(), model


def _summary(rep):
    return (rep.bytes_after, rep.bytes_before, [str(t) for t in rep.saved_after], rep.approximated,
            {name: (dict(p), p.counters) for name, p in rep.passes.items()}, rep.overhead_seconds)


def test_a_compile_served_by_the_cache_reports_what_the_first_one_did():
    hits = tc.autograd_cache_hits()
    losses, grads, first, _ = _train()
    assert tc.autograd_cache_hits() == hits and not first.graphs[0].from_cache
    first_summary = _summary(first)  # reads "before" too, which the entry then keeps
    losses2, grads2, second, model = _train()
    assert tc.autograd_cache_hits() > hits  # the partitioner did not run
    assert second.graphs[0].from_cache
    assert _summary(second) == first_summary and second.bytes_before > second.bytes_after
    assert "served by AOTAutograd's compile cache" in str(second)
    for a, b in zip(losses + [g for step in grads for g in step.values()],
                    losses2 + [g for step in grads2 for g in step.values()]):
        assert torch.equal(a, b)
    # Fira refuses approximated gradients: the marks must be on this model's parameters too
    marked = {n for n, p in model.named_parameters() if grad_approximation(p)}
    assert len(marked) == 6 and all("lora_A" in n for n in marked)


def test_a_report_never_read_leaves_the_before_unknown_and_says_so():
    _train(steps=1)  # its report is not read: its "before" is never partitioned
    _, _, second, _ = _train(steps=1)
    assert second.graphs[0].from_cache and second.bytes_before is None and second.bytes_after > 0
    assert "its bytes before the passes are unknown" in str(second)


def test_a_hit_without_its_entry_compiles_again():
    _, _, first, _ = _train(steps=1)
    folder = os.path.join(tc.inductor_cache_dir(), report_cache.FOLDER)
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    _, _, second, model = _train(steps=1)
    assert not second.graphs[0].from_cache and second.bytes_after == first.bytes_after
    assert second.bytes_before == first.bytes_before
    assert sum(grad_approximation(p) is not None for p in model.parameters()) == 6


def test_the_compiles_warnings_come_again_with_a_hit():
    options = {**OPTIONS, "targets": ["no_such_layer"]}
    with pytest.warns(UserWarning, match="match none of the"):
        _train(options, steps=1)
    with pytest.warns(UserWarning, match="match none of the"):
        _, _, second, _ = _train(options, steps=1)
    assert second.graphs[0].from_cache


def test_other_options_are_another_entry():
    _, _, first, _ = _train(steps=1)
    _, _, other, _ = _train({**OPTIONS, "activation": "compact"}, steps=1)
    assert not other.graphs[0].from_cache
    assert other.passes["activation_compression"].counters != {} and _summary(other) != _summary(first)


def test_a_block_serving_more_layers_is_planned_anew():
    """Under compile_blocks a block is planned for its share of memory_target (target / (layers + 1), the
    head's graph has one too): a deeper model with the same block must not get the shallower one's plan
    from the cache."""
    targets = []
    for layers in (2, 3):
        torch.compiler.reset()
        memcompile.clear_reports()
        model, ids = models.tiny_lora_llama(layers=layers), models.batch()
        memcompile.compile_blocks(model, {**OPTIONS, "memory_target": 80_000})
        model(input_ids=ids, labels=ids).loss.backward()
        block = next(g for g in memcompile.report().graphs if g.served)
        assert len(block.served) == layers and not block.from_cache
        targets.append(block.passes["memory_plan"].counters["target"])
    assert targets == [80_000 // 3, 80_000 // 4]


def test_an_inference_graph_served_by_the_cache_is_not_compiled_again():
    reports = []
    for _ in range(2):
        torch.compiler.reset()
        memcompile.clear_reports()
        model, ids = models.tiny_lora_llama(layers=1), models.batch()
        compiled = torch.compile(model, backend="memtrain", options=OPTIONS)
        with torch.no_grad():
            torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits)
        reports.append(memcompile.reports())
    assert [len(r) for r in reports] == [1, 1]
    assert reports[1][0].inference and reports[1][0].from_cache


def test_dump_dir_writes_the_graphs_of_every_compile(tmp_path):
    """dump_dir asks for each stage's graphs, which a compile served by the cache would not make."""
    for run in ("first", "second"):
        _, _, rep, _ = _train({**OPTIONS, "dump_dir": str(tmp_path / run)}, steps=1)
        assert not rep.graphs[0].from_cache
        written = os.listdir(tmp_path / run)
        assert any("forward" in f for f in written) and any("joint_after" in f for f in written), written


def test_an_evaluation_of_the_same_graph_keeps_the_training_entry():
    """The same Dynamo graph compiled under no_grad (an evaluation after training) is an inference
    graph: its entry must not replace the training graph's, or a restarted run's step report would
    take its training graph for an inference one and leave it out."""
    model, ids = models.tiny_lora_llama(layers=2), models.batch()
    memcompile.compile_blocks(model, OPTIONS)
    model(input_ids=ids, labels=ids).loss.backward()
    trained = memcompile.report().bytes_after
    with torch.no_grad():
        model(input_ids=ids)  # compiles the block again, for inference
    torch.compiler.reset()
    memcompile.clear_reports()
    model, ids = models.tiny_lora_llama(layers=2), models.batch()
    memcompile.compile_blocks(model, OPTIONS)
    model(input_ids=ids, labels=ids).loss.backward()
    rep = memcompile.report()
    assert all(g.from_cache and not g.inference for g in rep.graphs)
    assert any(g.served for g in rep.graphs) and rep.bytes_after == trained


def test_the_same_graph_under_autocast_has_its_own_report():
    _, _, plain, _ = _train(steps=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, autocast, _ = _train(steps=1)
    assert not autocast.graphs[0].from_cache
    assert any(t.dtype == "bfloat16" for t in autocast.saved_after)
    assert not any(t.dtype == "bfloat16" for t in plain.saved_after)


def test_a_dynamic_length_compile_writes_its_entry(caplog):
    """A graph compiled for any length (its sizes symbolic) reports sizes at the traced example, so its
    report can be written beside the cache; a later process is served it."""
    import pickle

    torch.compiler.reset()
    memcompile.clear_reports()
    model = models.tiny_lora_llama(layers=1)
    compiled = torch.compile(model, backend="memtrain", options={**OPTIONS, "fused_cross_entropy": True}, dynamic=True)
    ids = models.batch()
    with caplog.at_level("WARNING", logger="memcompile.report_cache"):
        compiled(input_ids=ids, labels=ids).loss.backward()
    assert not [r for r in caplog.records if "could not write" in r.getMessage()]
    rep = memcompile.report()
    assert rep.passes["cross_entropy"]["losses"]
    entries = os.listdir(os.path.join(tc.inductor_cache_dir(), report_cache.FOLDER))
    assert entries
    for name in entries:
        with open(os.path.join(tc.inductor_cache_dir(), report_cache.FOLDER, name), "rb") as f:
            pickle.load(f)
