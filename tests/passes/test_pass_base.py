"""The pass protocol: every pass's source and options reach the cache key, and results render and merge."""
import pytest

from memcompile import pipeline
from memcompile.config import MemtrainConfig
from memcompile.passes import base
from memcompile.passes.compression import METHODS

# Every pass of the pipeline runs under these options.
ALL_ON = MemtrainConfig(activation="velora", fused_cross_entropy=True, recompute_budget=0.5)
NAMES = ["model.layers.0.mlp.down_proj.weight"]


def _edited(monkeypatch, path):
    """Make ``path`` read as if it had been edited."""
    read = base.read_source
    monkeypatch.setattr(base, "read_source", lambda p: read(p) + (b"\n# edited\n" if p == path else b""))


def test_every_pass_runs_under_all_on():
    assert all(cls(ALL_ON).enabled() for cls in pipeline.PRE_AOT + pipeline.JOINT)


@pytest.mark.parametrize("cls", pipeline.PRE_AOT + pipeline.JOINT, ids=lambda c: c.__name__)
def test_cache_key_changes_with_each_pass_source(cls, monkeypatch):
    before = pipeline.cache_key(ALL_ON, NAMES)
    assert pipeline.cache_key(ALL_ON, NAMES) == before
    _edited(monkeypatch, base.module_file(cls.__module__))
    assert pipeline.cache_key(ALL_ON, NAMES) != before


@pytest.mark.parametrize("name", sorted(METHODS))
def test_cache_key_changes_with_the_chosen_method_source(name, monkeypatch):
    config = ALL_ON.replace(activation=name)
    before = pipeline.cache_key(config, NAMES)
    _edited(monkeypatch, base.module_file(METHODS[name].module))
    assert pipeline.cache_key(config, NAMES) != before


@pytest.mark.parametrize("module", ["memcompile.passes._graph", "memcompile.pipeline", "memcompile._torch_compat"])
def test_cache_key_changes_with_what_the_passes_import_and_the_pipeline(module, monkeypatch):
    before = pipeline.cache_key(ALL_ON, NAMES)
    _edited(monkeypatch, base.module_file(module))
    assert pipeline.cache_key(ALL_ON, NAMES) != before


def test_cache_key_changes_with_partitioner_options():
    keys = {pipeline.cache_key(c, NAMES) for c in (
        ALL_ON, ALL_ON.replace(recompute_budget=0.25), ALL_ON.replace(recompute_budget=None),
        ALL_ON.replace(recompute_budget=None, partitioner="default"), ALL_ON.replace(compiler="aot_eager"),
        ALL_ON.replace(fused_cross_entropy=False), ALL_ON.replace(targets=("*",)))}
    assert len(keys) == 7


def test_result_reads_as_a_dict_renders_and_merges():
    a = base.PassResult("p", rewritten=[{"x": 1}], skipped=[{"layer": "l1", "reason": "r"}], counters={"n": 1})
    b = base.PassResult("p", skipped=[{"layer": "l2", "reason": "r"}], counters={"n": 2, "m": 1},
                        approximated={"w": "velora"})
    merged = a.merged(b)
    assert dict(merged) == {"rewritten": [{"x": 1}], "skipped": a.skipped + b.skipped, "counters": {"n": 3, "m": 1}}
    assert merged.approximated == {"w": "velora"} and merged.get("losses") is None
    assert merged.render() == ["  pass p: {'n': 3, 'm': 1}", "    rewrote {'x': 1}", "    skipped (r): l1, l2"]
