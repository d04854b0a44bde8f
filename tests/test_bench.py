"""``python -m memcompile.bench``: train mode end to end on the tiny model (each setup in its own
process), the parts that must never take the bench down (failed setups, no CUDA), and converge mode's
coreset comparison on the bundled text's sources (in-process, two steps)."""
from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch

from memcompile.bench.setups import CORESET_COMPARISON

SETUPS = ("lora", "memtrain_velora")


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    from memcompile.bench.__main__ import main

    path = tmp_path_factory.mktemp("bench") / "train.jsonl"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rows = main(["train", "--model", "tiny", "--seq", "64", "--batch", "2", "--warmup", "1", "--steps", "2",
                     "--setups", ",".join(SETUPS), "--baseline", "lora", "--compiler", "aot_eager",
                     "--json", str(path)])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return rows, lines, out.getvalue()


def test_every_setup_ran_and_json_matches(train_run):
    rows, lines, _ = train_run
    assert [r["setup"] for r in rows] == list(SETUPS)
    assert [r["status"] for r in rows] == ["ok"] * len(SETUPS), [r["status"] for r in rows]
    assert lines == rows


def test_fields_are_measured_numbers(train_run):
    rows, _, _ = train_run
    for r in rows:
        assert isinstance(r["saved_bytes"], int) and r["saved_bytes"] > 0, r
        assert r["tok_per_s"] > 0 and r["compile_s"] > 0
        assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"])
        assert r["mem_metric"] == ("saved_bytes" if r["device"] == "cpu" else "peak_gib")
        assert r["baseline"] == "lora" and r["speed_ratio"] > 0
    by = {r["setup"]: r for r in rows}
    assert by["lora"]["saved_by"] == "hooks"
    assert by["memtrain_velora"]["saved_by"] == "memtrain report"
    assert by["memtrain_velora"]["compiler"] == "memtrain/aot_eager"
    # Same weights, same batch: the first loss is the forward before any update.
    assert by["lora"]["loss_first"] == pytest.approx(by["memtrain_velora"]["loss_first"], rel=1e-5)


def test_a_hugging_face_config_trains_as_its_shape(train_run, tmp_path):
    """``--model`` with the tiny shape's own config.json: the same random weights, so the same first loss."""
    from memcompile.bench import models
    from memcompile.bench.__main__ import main

    models.model_config("tiny").to_json_file(str(tmp_path / "config.json"))
    with contextlib.redirect_stdout(io.StringIO()):
        (row,) = main(["train", "--model", str(tmp_path / "config.json"), "--seq", "64", "--batch", "2", "--warmup",
                       "0", "--steps", "1", "--setups", "lora", "--baseline", "lora", "--compiler", "aot_eager"])
    named = {r["setup"]: r for r in train_run[0]}["lora"]
    assert row["status"] == "ok" and row["loss_first"] == named["loss_first"]
    assert row["saved_bytes"] == named["saved_bytes"]


def test_memtrain_saves_less_than_eager_lora(train_run):
    rows, _, _ = train_run
    by = {r["setup"]: r for r in rows}
    velora = by["memtrain_velora"]
    assert velora["saved_bytes"] < by["lora"]["saved_bytes"]
    assert velora["saved_bytes"] < velora["saved_bytes_before"]  # the passes, not only the partitioner
    assert velora["saved_bytes_hooks"] == velora["saved_bytes"]  # hooks and report count the same storages
    assert by["lora"]["mem_ratio"] == 1.0 and velora["mem_ratio"] < 1.0


def test_table_is_printed(train_run):
    _, _, printed = train_run
    header = next(line for line in printed.splitlines() if line.startswith("setup "))
    for column in ("saved activations", "tok/s", "1st step s", "loss first", "loss last", "memory vs base",
                   "speed vs base"):
        assert column in header
    assert all(any(line.startswith(name + " ") for line in printed.splitlines()) for name in SETUPS)


def test_failures_become_rows():
    from memcompile.bench import worker

    assert worker.run({"mode": "no-such-mode", "setup": "lora"})["status"].startswith("error: ValueError")


def test_unavailable_follows_what_memcompile_exports():
    import memcompile
    from memcompile.bench.setups import SETUPS as TABLE
    from memcompile.bench.setups import unavailable

    has_prepare = callable(getattr(memcompile, "prepare", None))
    assert (unavailable(TABLE["memtrain_qdylora"]) is None) == has_prepare
    assert unavailable(TABLE["lora"]) is None


def test_setup_table_is_well_formed():
    from memcompile.bench.setups import CONVERGE_DEFAULT, TRAIN_DEFAULT, select
    from memcompile.bench.setups import SETUPS as TABLE

    for name, s in TABLE.items():
        assert s.name == name
        assert s.adapter in ("peft", "prepare", "none") and s.compile in ("none", "inductor", "memtrain")
        assert s.optimizer in ("adamw", "fira", "galore")
        assert bool(s.memtrain) == (s.compile == "memtrain")
        assert s.selection in ("all", "coreset", "random") and s.pool_factor >= (1 if s.selection == "all" else 2)
        assert s.moment_transfer in (None, "official", "align", "rotate")
    assert [s.name for s in select(None, "train", TRAIN_DEFAULT)] == list(TRAIN_DEFAULT)
    assert [s.name for s in select(None, "converge", CONVERGE_DEFAULT)] == list(CONVERGE_DEFAULT)
    with pytest.raises(SystemExit, match="unknown setup"):
        select("lora,nope", "train", TRAIN_DEFAULT)


def test_moment_transfer_setups_reach_the_optimizer():
    transformers = pytest.importorskip("transformers")
    from memcompile.bench.builders import _optimizer
    from memcompile.bench.setups import MOMENT_TRANSFER_COMPARISON, Setup, select, unavailable

    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    for s in select(",".join(MOMENT_TRANSFER_COMPARISON), "converge", ()):
        assert unavailable(s) is None
        opt = _optimizer(s, model, list(model.parameters()), 1e-2, torch.device("cpu"))
        fira = [g for g in opt.param_groups if g["rank"] is not None]
        assert fira and all(g["moment_transfer"] == s.moment_transfer for g in fira)
        assert all(g["residual"] == (s.optimizer == "fira") for g in fira)
    with pytest.raises(ValueError, match="moment_transfer"):
        Setup("x", "AdamW with a Fira option", optimizer="adamw", moment_transfer="align")


def test_every_mode_runs_a_module_with_main():
    import argparse
    import importlib

    from memcompile.bench.__main__ import MODES, parser

    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(MODES)
    assert all(callable(importlib.import_module(f"memcompile.bench.{m}").main) for m in MODES.values())
    for mode, module in MODES.items():  # ``<mode> --help`` explains the mode with its module's docstring
        doc = importlib.import_module(f"memcompile.bench.{module}").__doc__
        assert doc and doc.strip().splitlines()[0] in sub.choices[mode].format_help(), mode


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_kernels_mode_without_cuda_says_so():
    from memcompile.bench.__main__ import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["kernels"]) == []
    assert "kernels mode needs CUDA" in out.getvalue()


def test_every_kernel_has_bench_inputs_that_run_and_match_torch():
    """Every ``<op>_ref`` of memcompile.kernels has a case in kernels mode, and at the interpreter's
    tiny sizes every implementation runs and (unless marked as differing) equals torch's."""
    from memcompile.bench import kernels
    from memcompile.bench.kernel_cases import CASES

    ops, broken = kernels.discover()
    assert not broken and set(ops) == set(CASES)
    for op, make in CASES.items():
        for case in make(torch.device("cpu"), True):
            ref = case.impls["torch"]()
            for impl, fn in case.impls.items():
                if impl == "torch" or impl in case.differ or impl == "bitsandbytes":
                    continue  # bitsandbytes: its own tests compare it bit for bit
                out = fn()
                torch.testing.assert_close(out.float(), ref.float(), rtol=1e-4, atol=1e-5, msg=f"{op} {impl}")


def test_sources_are_real_text_of_very_different_sizes():
    from pydoc_data.topics import topics

    from memcompile import textdata

    sources = textdata.sources()
    sizes = [len(t) for t in sources.values()]
    assert len(sources) >= 5
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] >= 10 * sizes[-1], dict(zip(sources, sizes))
    # Every help topic is in exactly one source: the sources hold all of them, and a blank line between
    # two topics of a source.
    topic_bytes = sum(len(text.encode("utf-8")) for text in topics.values())
    assert sum(sizes) == topic_bytes + 2 * (len(topics) - len(sources))
    assert all(t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) < textdata.VOCAB
               for t in sources.values())


def test_source_batches_draw_labelled_windows_in_proportion_to_size():
    from memcompile import textdata

    sources = textdata.sources()
    data = textdata.SourceBatches(sources, seq=32, batch=16, seed=3)
    again = textdata.SourceBatches(sources, seq=32, batch=16, seed=3)
    train = {name: bytes(t[:int(len(t) * 0.95)].tolist()) for name, t in sources.items()}
    counts = torch.zeros(len(sources))
    for _ in range(50):
        ids, labels = next(data)
        ids2, labels2 = next(again)
        assert torch.equal(ids, ids2) and torch.equal(labels, labels2)
        assert ids.shape == (16, 32) and labels.shape == (16,)
        counts += torch.bincount(labels, minlength=len(sources))
    for row, label in zip(ids.tolist(), labels.tolist()):  # each window comes from its source's train part
        assert bytes(row) in train[data.names[label]]
    assert counts[0] > 5 * counts[-1]  # the smallest source is rare in the pools
    held = textdata.SourceBatches(sources, seq=32, batch=4, seed=1, split="eval").per_source(3)
    assert list(held) == list(sources) and all(w.shape == (3, 32) for w in held.values())


@pytest.fixture(scope="module")
def coreset_runs():
    """The three coreset-comparison setups run in-process for two steps, every training step spied on."""
    import dataclasses

    from memcompile.bench import converge
    from memcompile.bench.builders import Options

    seen: dict[str, dict] = {}
    real_build = converge.build

    def spy_build(*args, **kwargs):
        built = real_build(*args, **kwargs)
        log = seen.setdefault(built.setup.name, {"pools": [], "sources": [], "rows": [], "trained": []})
        step, forward = built.step, built.forward
        in_step = [False]

        def forward_spy(**kw):
            if in_step[0]:  # the training forward: not the coreset's selection, evaluation or counting
                log["trained"].append(kw["input_ids"].clone())
            return forward(**kw)

        def step_spy(ids, sources=None):
            in_step[0] = True
            try:
                loss = step(ids, sources)
            finally:
                in_step[0] = False
            log["pools"].append(ids.clone())
            log["sources"].append(sources.clone())
            log["rows"].append(built.last_rows.clone())
            return loss

        built.forward, built.step = forward_spy, step_spy
        return built

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the bench's CPU setting: the tiny model is slower with more on a busy machine
    converge.build = spy_build
    try:
        opts = Options(model="tiny", seq=32, batch=4, compiler="aot_eager")
        rows = [{"setup": name, "status": "ok", **converge.run_setup(
            {"setup": name, "options": dataclasses.asdict(opts), "steps": 2, "eval_every": 2, "lr": None},
            lambda message: None)} for name in CORESET_COMPARISON]
    finally:
        converge.build = real_build
        torch.set_num_threads(threads)
    return rows, seen


def test_coreset_setups_see_the_same_pools(coreset_runs):
    rows, seen = coreset_runs
    assert len({r["data_sha1"] for r in rows}) == 1
    assert len({r["evals"][0][1] for r in rows}) == 1  # same weights before training
    base = seen["full_batch"]
    for name in CORESET_COMPARISON:
        assert len(seen[name]["pools"]) == 2
        for pool, ref, sources, ref_sources in zip(seen[name]["pools"], base["pools"], seen[name]["sources"],
                                                   base["sources"]):
            assert pool.shape == (8, 32) and torch.equal(pool, ref) and torch.equal(sources, ref_sources)


def test_half_setups_train_on_half_the_pool_and_full_batch_on_all(coreset_runs):
    from collections import Counter

    rows, seen = coreset_runs
    by = {r["setup"]: r for r in rows}
    for name, keep in (("full_batch", 8), ("random_half", 4), ("coreset", 4)):
        assert by[name]["pool_rows"] == 8 and by[name]["rows_trained"] == keep
        assert sum(by[name]["trained_by_source"].values()) == 2 * keep
        for pool, rows_, trained in zip(seen[name]["pools"], seen[name]["rows"], seen[name]["trained"]):
            assert len(rows_) == keep and len(set(rows_.tolist())) == keep
            assert torch.equal(trained, pool[rows_])  # what the forward trained on is those pool rows
    # CoLM keeps every row of a source with fewer rows than the mean per source present in the pool.
    for sources, rows_ in zip(seen["coreset"]["sources"], seen["coreset"]["rows"]):
        counts = Counter(sources.tolist())
        small = {s for s, c in counts.items() if c < len(sources) / len(counts)}
        assert {i for i, s in enumerate(sources.tolist()) if s in small} <= set(rows_.tolist())
    # Half the rows, about half the saved activations.
    full = by["full_batch"]["saved_bytes"]
    for name in ("random_half", "coreset"):
        assert 0.4 * full < by[name]["saved_bytes"] < 0.6 * full


def test_converge_table_and_files_show_sources_and_memory(coreset_runs, tmp_path):
    from memcompile.bench import converge
    from memcompile.bench.table import render, status_notes

    rows = [dict(r) for r in coreset_runs[0]]
    converge.add_memory_ratios(rows, cuda=False)
    by = {r["setup"]: r for r in rows}
    assert by["full_batch"]["mem_ratio"] == 1.0 and by["coreset"]["mem_ratio"] < 0.6
    status, _ = status_notes(rows)
    header = render(rows, converge.columns(status)).splitlines()[0]
    for column in ("rows/step", "held-out end", "balanced end", "saved activations", "memory vs full_batch"):
        assert column in header
    held, trained = converge.source_columns(rows)
    for name in by["coreset"]["source_shares"]:
        assert name in held.splitlines()[0] and name in trained.splitlines()[0]
    converge.write_csv(rows, str(tmp_path / "losses.csv"))
    head = (tmp_path / "losses.csv").read_text().splitlines()[0].split(",")
    assert head[:5] == ["setup", "step", "train_loss", "eval_loss", "eval_balanced"]
    assert len(head) == 5 + len(by["coreset"]["source_shares"])
    converge.plot(rows, str(tmp_path / "losses.png"), "test")
    assert (tmp_path / "losses.png").stat().st_size > 0


def test_busy_time_counts_overlapping_spans_once():
    """A copy stream beside the compute stream: the device is busy for the union of their spans."""
    from memcompile.bench.measure import busy_union

    assert busy_union([]) == 0
    assert busy_union([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert busy_union([(20, 25), (0, 10), (2, 3)]) == 15


def test_allocator_replay_finds_the_peak_and_what_is_live_there(tmp_path):
    """The CUDA allocator's history, replayed: the peak is relative to the step's start (a block from
    before it, freed in it, counts down), and the live set is taken at that peak, grouped by the first
    frame outside torch."""
    import os

    from memcompile.bench.measure import live_sites, replay_peak

    torch_file = os.path.join(os.path.dirname(torch.__file__), "nn", "functional.py")
    code = tmp_path / "generated.py"
    code.write_text("def call():\n    buf0 = empty_strided_cuda((4, 8), (8, 1), torch.bfloat16)\n")

    def alloc(addr, size, line=2):
        frames = [{"filename": torch_file, "line": 1, "name": "linear"},
                  {"filename": str(code), "line": line, "name": "call"}]
        return {"action": "alloc", "addr": addr, "size": size, "frames": frames}

    def free(addr, size):
        return {"action": "free_requested", "addr": addr, "size": size}

    events = [alloc(1, 100), alloc(2, 50), free(99, 30),  # 99: allocated before the trace
              free(1, 100), alloc(3, 200), alloc(4, 200, line=1),  # peak: 50 - 30 + 400 = 420
              {"action": "free_completed", "addr": 1, "size": 100}, free(3, 200), alloc(5, 10)]
    peak, live = replay_peak(events)
    assert peak == 420
    assert sorted(b["addr"] for b in live) == [2, 3, 4]
    sites = live_sites(live)
    assert [(s["bytes"], s["count"]) for s in sites] == [(200, 1), (200, 1), (50, 1)]
    assert sites[0]["site"].startswith("generated.py:2 call: buf0 = empty_strided_cuda(")
    assert sites[1]["site"] == "generated.py:1 call: def call():"
    assert replay_peak([]) == (0, [])


def test_compile_time_runs_each_variant_cold_then_warm(tmp_path):
    """`python -m memcompile.bench compile-time --warm`: each variant in a fresh process with empty caches,
    then again with the caches it left; the restarted run is served by the compile cache (no joint trace)
    and reports the same saved bytes. ``--profile`` then profiles a third, cold regional run's first step
    (not a row)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "ct.jsonl"
    subprocess.run([sys.executable, "-m", "memcompile.bench", "compile-time", "--model", "tiny", "--seq", "16",
                    "--compiler", "inductor", "--dtype", "fp32", "--variants", "regional", "--warm",
                    "--json", str(out), "--timeout", "600", "--profile", str(tmp_path)],
                   check=True, capture_output=True, text=True)
    cold, warm = [json.loads(line) for line in out.read_text().splitlines()]
    profile = (tmp_path / "compile-time-profile-regional.txt").read_text()
    assert "by cumulative" in profile and "by tottime" in profile and "compile_fx" in profile
    assert (cold["caches"], warm["caches"]) == ("cold", "warm") and "error" not in warm, warm
    assert cold["phases_s"].get("aot_trace_joint_graph", 0) > 0 and "aot_trace_joint_graph" not in warm["phases_s"]
    assert warm["report_saved_bytes"] == cold["report_saved_bytes"] > 0
    assert warm["saved_bytes"] == cold["saved_bytes"]
    # Inductor compiled four graphs cold: the block's and the loss's, forward and backward
    assert len(cold["graph_compiles_s"]) == 4 and cold["compile_threads"] >= 1


_TUNED_KERNEL = '''
import triton
import triton.language as tl

TIMES = {1024: 2.0, 2048: 1.0}  # ms each config "takes"


def bench(kernel_call, quantiles):
    kernel_call()
    return [TIMES[bench.block.pop(0)]] * 3


bench.block = [1024, 2048]


@triton.autotune([triton.Config({"BLOCK": 1024}, num_warps=4), triton.Config({"BLOCK": 2048}, num_warps=8)],
                 key=["n"], do_bench=bench)
@triton.jit
def _fill(out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, 1.0, mask=offs < n)
'''


def test_kernel_rows_say_what_the_autotuner_chose(tmp_path, monkeypatch):
    """The kernels mode records, for an autotuned kernel's first call at a size, the config it chose and
    each config's time, and the GPU report shows them."""
    from memcompile.bench import gpu_report, kernels

    (tmp_path / "tuned_kernel_example.py").write_text(_TUNED_KERNEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    import tuned_kernel_example as mod

    out = torch.zeros(3000)
    mod._fill[lambda meta: (-(-3000 // meta["BLOCK"]),)](out, 3000)
    assert torch.equal(out, torch.ones(3000))
    tuning = kernels._tuning("tuned_kernel_example")
    assert list(tuning) == ["_fill"] and "BLOCK: 2048" in tuning["_fill"]["best"]
    assert sorted(tuning["_fill"]["ms"].values()) == [1.0, 2.0]
    row = {"op": "fill", "size": "3000", "impl": "triton", "status": "ok", "first_call_s": 0.5, "tuning": tuning}
    table = "\n".join(gpu_report.tuning_table({"kernels": [row, {"op": "other", "status": "ok"}]}))
    assert "| fill | 3000 | 0.500 | _fill |" in table and "BLOCK: 2048" in table and "other" not in table
