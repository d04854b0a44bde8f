"""``make gpu-check`` without a GPU: the dry run of every step (CPU, tiny model, Triton interpreter), the
step runner's limits, the rendering of a run into the README, and ``max-context``'s search."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from memcompile.bench import gpu_check, gpu_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_without_cuda_it_says_it_needs_a_gpu(capsys):
    from memcompile.bench.__main__ import main

    with pytest.raises(SystemExit) as stop:
        main(["gpu"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--dry-run" in err


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The whole check as make runs it, in a fresh process, with the GPU hidden."""
    out = tmp_path_factory.mktemp("gpu") / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)  # the dry run sets what its steps need itself
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "memcompile.bench", "gpu", "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, time.perf_counter() - started


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_dry_run_runs_every_step_and_writes_its_results(dry_run):
    out, printed, seconds = dry_run
    plan = gpu_check.steps(dry=True)
    records = {r["step"]: r for r in _jsonl(out / "steps.jsonl")}
    assert set(records) == {s.name for s in plan}
    for step in plan:
        r = records[step.name]
        assert r["status"] == "ok", r
        assert 0 < r["seconds"] <= r["limit"] <= step.limit
        for name in step.results:
            assert (out / name).stat().st_size > 0, name
        assert (out / f"{step.name}.log").exists()
    assert seconds < gpu_check.TOTAL_S * gpu_check.DRY_SCALE
    assert f"{len(plan)} of {len(plan)} steps ok" in printed


def test_dry_run_results_hold_what_the_gpu_run_would(dry_run):
    from memcompile.bench.kernel_cases import CASES

    out, _, _ = dry_run
    header = json.loads((out / "header.json").read_text())
    for key in ("torch", "triton", "transformers", "peft", "bitsandbytes", "python", "cuda_available"):
        assert key in header
    assert header["torch"] == torch.__version__ and header["cuda_available"] is False
    assert {r["op"] for r in _jsonl(out / "kernels.jsonl")} == set(CASES)
    assert all(r["status"] == "ok" for r in _jsonl(out / "kernels.jsonl"))
    estimates = {r["setup"]: r for r in _jsonl(out / "estimate.jsonl")}
    assert list(estimates) == list(gpu_check.ESTIMATE)
    for name in gpu_check.TRAIN:
        (row,) = _jsonl(out / f"train-{name}.jsonl")
        assert row["setup"] == name
        assert row["status"] == "ok", row
        assert row["model"] == "tiny" and row["tok_per_s"] > 0
        if name in estimates:
            assert estimates[name]["status"] == "ok" and estimates[name]["peak_gib"] > 0
    summary = gpu_report.pytest_summary(str(out))
    assert summary["tests"] > 0 and summary["failures"] == summary["errors"] == 0


def test_render_fills_the_readme_section_from_a_run(dry_run, tmp_path):
    out, _, _ = dry_run
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{gpu_report.BEGIN}\nold\n{gpu_report.END}\n\nafter\n")
    docs = tmp_path / "docs" / "gpu"
    (Path(out) / "notes.md").write_text("Run by hand after the check: nothing.\n")
    from memcompile.bench.__main__ import main

    with contextlib.redirect_stdout(io.StringIO()):
        body = main(["render-gpu", str(out), "--docs", str(docs), "--readme", str(readme)])
    text = readme.read_text()
    assert "old" not in text and text.endswith("after\n") and body in text
    assert "Run by hand after the check: nothing." in body  # the run's notes.md, verbatim
    assert "**Dry run**" in body
    for name in gpu_check.TRAIN:
        assert f"| {name} |" in body
    for step in gpu_check.steps(dry=True):
        assert f"| {step.name}" in body
    assert "pytest -m gpu" in body and "| cross_entropy |" in body
    assert "| host µs a call |" in body and "| memtrain::nf4_dequant |" in body  # each call's host time
    assert "Where a step's time goes" in body  # train --profile: device busy time against the step, top ops
    assert re.search(r"\| memtrain_all_regional \| \d+ / \d+ ms \| `[^`]+` \| [\d.]+ \| \d+ \|", body)
    assert (docs / "steps.jsonl").exists() and (docs / "README.md").exists()
    # Rendering again from docs/gpu/ alone gives the same section.
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["render-gpu", "--docs", str(docs), "--readme", str(readme)]) == body
    assert readme.read_text() == text


def test_readme_section_is_the_rendering_of_docs_gpu_and_shows_the_plan():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    expected = gpu_report.section(gpu_report.load(os.path.join(ROOT, "docs", "gpu")))
    assert gpu_report.replace_section(readme, expected) == readme, "run: python -m memcompile.bench render-gpu"
    with open(os.path.join(ROOT, "docs", "gpu-check.md")) as f:
        assert gpu_check.plan_table(gpu_check.steps()) in f.read()
    assert sum(s.limit for s in gpu_check.steps() if not s.background) <= gpu_check.TOTAL_S


def _alive(pid: int) -> bool:
    """Running (a killed process whose parent is gone can stay a zombie where nothing reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_step_past_its_limit_is_stopped_with_its_children_and_the_run_goes_on(tmp_path):
    pid_file = tmp_path / "child.pid"
    # A step that starts a child which would outlive it, then hangs: both must be stopped at the limit.
    hang = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); "
            "time.sleep(60)")
    plan = [gpu_check.Step("hangs", [sys.executable, "-c", hang], 3, "hangs"),
            gpu_check.Step("fails", [sys.executable, "-c", "raise RuntimeError('boom')"], 10, "fails"),
            gpu_check.Step("works", [sys.executable, "-c", "print('fine')"], 100, "works")]
    with contextlib.redirect_stdout(io.StringIO()):
        records = gpu_check.run(plan, str(tmp_path / "out"), total=60, env=dict(os.environ))
    by = {r["step"]: r for r in records}
    assert by["hangs"]["status"] == "timed out after 3 s" and by["hangs"]["seconds"] < 10
    child = int(pid_file.read_text())
    time.sleep(0.5)
    assert not _alive(child)
    assert "started" in (tmp_path / "out" / "hangs.log").read_text()
    assert by["fails"]["status"].startswith("failed: exit code 1: RuntimeError: boom")
    assert by["works"]["status"] == "ok" and by["works"]["limit"] < 60  # its 100 s cut to what was left
    assert [r["step"] for r in _jsonl(tmp_path / "out" / "steps.jsonl")] == ["hangs", "fails", "works"]
    # With less than MIN_STEP_S left, a step does not start.
    with contextlib.redirect_stdout(io.StringIO()):
        (late,) = gpu_check.run(plan[2:], str(tmp_path / "late"), total=gpu_check.MIN_STEP_S - 1,
                                env=dict(os.environ))
    assert late["status"].startswith("skipped:") and not (tmp_path / "late" / "works.log").exists()


def test_max_context_search_finds_the_longest_length_that_fits():
    from memcompile.bench.max_context import parse_memory, search

    for a, b, c in [(5 * 2**30, 300_000, 0.0), (2**30, 7_000, 0.05), (70 * 2**30, 10**6, 0.0)]:
        def peak(seq):
            return int(a + b * seq + c * seq * seq)

        limit = 80 * 2**30
        found = search(peak, limit, 1024, 2**21, start=16384)
        best = max([s for s in range(1024, 2**21 + 1, 1024) if peak(s) <= limit], default=0)
        assert found["fits"] == best
        if best:
            assert found["fits_peak"] == peak(best) <= limit
            assert found["fails"] == best + 1024 and found["fails_peak"] > limit
        assert len(found["probes"]) <= 20  # bisection from 1024 tokens to 2M would take 21 on its own
    assert parse_memory("80GiB") == 80 * 2**30 and parse_memory("80GB") == 80 * 10**9
    with pytest.raises(ValueError):
        parse_memory("lots")


def test_max_context_on_the_estimate_end_to_end():
    from memcompile.bench.__main__ import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        (row,) = main(["max-context", "--model", "tiny", "--gpu-memory", "0.01GiB", "--setups", "lora_gc",
                       "--resolution", "64", "--start", "256", "--no-confirm"])
    assert row["status"] == "ok", row
    assert row["fits"] > 0 and row["fails"] == row["fits"] + 64
    assert row["fits_bytes"] <= row["limit_bytes"] < row["fails_bytes"]
    probes = dict((s, g) for s, g in row["probes"])
    assert probes[row["fits"]] == row["fits_gib"]
    longer = sorted(probes)
    assert all(probes[x] <= probes[y] for x, y in zip(longer, longer[1:]))  # more tokens, more memory
    assert "longest that fits" in out.getvalue()


def test_max_context_confirms_with_one_step_at_the_length_found_and_one_above(monkeypatch):
    import argparse

    from memcompile.bench import max_context

    jobs = []

    def fake_run(job, progress, timeout=None):
        jobs.append(job)
        return {"status": "ok" if job["options"]["seq"] <= 4096 else "OOM", "peak_gib": 1.5}

    monkeypatch.setattr(max_context, "run_isolated", fake_run)
    rows = [{"setup": "nf4_gc", "status": "ok", "fits": 4096, "resolution": 1024},
            {"setup": "lora_gc", "status": "error: x"}]
    args = argparse.Namespace(model="tiny", batch=1, budget=0.3, seed=0, timeout=None)
    with contextlib.redirect_stderr(io.StringIO()):
        max_context.confirm(rows, args)
    assert [(j["setup"], j["options"]["seq"], j["steps"], j["warmup"]) for j in jobs] == [
        ("nf4_gc", 4096, 1, 0), ("nf4_gc", 5120, 1, 0)]
    assert all(j["mode"] == "train" and j["count_saved"] is False and j["options"]["batch"] == 1 for j in jobs)
    assert rows[0]["gpu_at_fits"] == {"seq": 4096, "status": "ok", "peak_gib": 1.5}
    assert rows[0]["gpu_above"]["status"] == "OOM" and "gpu_at_fits" not in rows[1]


def test_a_pytest_step_stopped_before_its_xml_is_counted_from_its_log(tmp_path):
    (tmp_path / "pytest-gpu.log").write_text(
        "collecting ... collected 9 items\n"
        "tests/kernels/test_a.py::test_x[cuda] PASSED [ 10%]\n"
        "    | tests/test_b.py::test_y[compact] FAILED [ 20%]\n"
        "tests/test_b.py::test_z SKIPPED (no bnb) [ 30%]\n"
        "tests/test_b.py::test_slow\n")
    summary = gpu_report.pytest_summary(str(tmp_path))
    assert summary == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1, "passed": 1,
                       "failed": ["tests.test_b::test_y[compact]"], "stopped": True}
    assert gpu_report.pytest_summary(str(tmp_path), "rerun-pytest-gpu.xml") is None


def test_the_peak_table_shows_each_traced_setups_largest_sites():
    row = {"setup": "memtrain_all_regional", "peak_gib": 9.41, "peak_traced_gib": 9.38, "peak_base_gib": 0.87,
           "peak_sites": [{"site": "c.py:120 call: buf7 = empty_strided_cuda((8192, 32000), ...)", "size": 524288000,
                           "count": 1, "bytes": 524288000}]}
    rows = gpu_report.peak_table({"train": [row, {"setup": "qlora_gc"}], "rerun_train": []})
    assert rows[2] == ("| memtrain_all_regional | 9.41 / 9.38 / 0.87 | `c.py:120 call: buf7 = "
                       "empty_strided_cuda((8192, 32000), ...)` | 0.488 | 1 x 524,288,000 |")
    assert len(rows) == 3 and gpu_report.peak_table({"train": [], "rerun_train": []}) == []


def test_the_host_time_table_lists_each_profiled_setups_host_ops():
    row = {"setup": "memtrain_all_bf16_target_regional", "profile_busy_ms": 115.1, "step_s": 0.21,
           "profile_top": [{"op": "aten::mm", "self_ms": 70.69, "calls": 1366}],
           "profile_host_top": [{"op": "memtrain::nf4_linear", "self_ms": 51.97, "calls": 220},
                                {"op": "cudaStreamSynchronize", "self_ms": 9.5, "calls": 22}]}
    run = {"train": [row, {"setup": "qlora_gc"}], "rerun_train": []}
    host = gpu_report.profile_table(run, field="profile_host_top")
    assert host[2:] == ["| memtrain_all_bf16_target_regional | 115 / 210 ms | `memtrain::nf4_linear` | 51.97 | 220 |",
                        "|  |  | `cudaStreamSynchronize` | 9.50 | 22 |"]
    assert gpu_report.profile_table(run)[2:] == ["| memtrain_all_bf16_target_regional | 115 / 210 ms | `aten::mm` | "
                                                 "70.69 | 1366 |"]


def test_the_compile_time_table_shows_each_variant():
    rows = [{"variant": "whole", "model": "tinyllama", "seq": 2048, "batch": 4, "dtype": "bf16", "startup_s": 4.1,
             "first_step_s": 88.0, "cold_first_step_s": 92.1, "second_step_s": 0.18, "saved_bytes": 7953219588},
            {"variant": "regional", "error": "CUDA out of memory"}]
    table = gpu_report.compile_time_table({"compile_time": rows})
    assert table[2] == "| whole | tinyllama 4 x 2048, bf16 | 4.1 | 88.0 | 92.1 | 0.18 | 7,953,219,588 |"
    assert table[3].startswith("| regional | error: CUDA out of memory")
    assert gpu_report.compile_time_table({"compile_time": []}) == []


def test_the_compile_stage_table_splits_each_first_step():
    phases = {"bytecode_tracing": 1.0, "aot_trace_joint_graph": 0.5, "aot_collect_metadata": 0.25,
              "memtrain.joint_passes": 0.2, "memtrain.report_copy": 0.05, "memtrain.partition": 0.4,
              "GraphLowering.run": 1.0, "GraphLowering.codegen": 2.0, "Scheduler.codegen": 1.5,
              "async_compile.wait": 3.0, "CachingAutotuner.benchmark_all_configs": 0.6, "compile_fx_inner": 7.0}
    rows = [{"variant": "whole", "first_step_s": 20.0, "phases_s": phases},
            {"variant": "regional", "first_step_s": 10.0, "caches": "warm",
             "phases_s": {**phases, "async_compile.wait": 1.0, "async_compile.precompile": 0.5}},
            {"variant": "old", "first_step_s": 9.0}]  # recorded before the breakdown: left out
    table = gpu_report.compile_stage_table({"compile_time": rows})
    assert table[0] == "| stage | whole s | regional (warm caches) s |"
    by_stage = {r.split(" | ")[0].lstrip("| "): r.split(" | ")[1:] for r in table[2:]}
    assert by_stage["AOTAutograd's joint trace"] == ["0.75", "0.75 |"]
    assert by_stage["memtrain's passes"] == ["0.25", "0.25 |"]
    # Scheduler.codegen is inside GraphLowering.codegen: not counted twice
    assert by_stage["Inductor's lowering and code generation"] == ["3.00", "3.00 |"]
    # builds in the compiling process (before the workers are up) count with the waits for the workers
    assert by_stage["kernel builds (waiting for workers, or in the compiling process)"] == ["3.00", "1.50 |"]
    assert by_stage["the rest (running the step, guards, eager code)"] == ["11.00", "2.50 |"]
    assert gpu_report.compile_stage_table({"compile_time": rows[2:]}) == []


def test_the_train_table_shows_the_peak_after_the_first_step_where_recorded():
    """The first step also compiles; a run that recorded the later steps' peak shows it beside the peak."""
    row = {"setup": "memtrain_all_regional", "status": "ok", "peak_gib": 9.41, "peak_later_gib": 8.9,
           "tok_per_s": 45259.0, "compile_s": 15.6, "model": "tinyllama", "seq": 2048, "batch": 4,
           "saved_bytes_hooks": 7 * 2**30}
    run = {"train": [row], "estimate": [{"setup": "memtrain_all_regional", "status": "ok", "peak_gib": 8.81,
                                         "saved_gib": 6.98}]}
    table = gpu_report.train_table(run)
    assert "| peak GiB | after the 1st step GiB | est. peak GiB |" in table[0]
    assert table[0].endswith("| saved GiB | est. saved GiB |")
    assert table[2].startswith("| memtrain_all_regional | ok | 9.41 | 8.90 | 8.81 | -6 % | 45,259 | 15.6 |")
    assert table[2].endswith("| 7.00 | 6.98 |")
    assert len({line.count("|") for line in table}) == 1
    without = gpu_report.train_table({"train": [{**row, "peak_later_gib": None}], "estimate": run["estimate"]})
    assert "after the 1st step" not in without[0] and without[2].startswith("| memtrain_all_regional | ok | 9.41 | 8.81 |")
