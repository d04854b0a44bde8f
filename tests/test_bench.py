"""``python -m memcompile.bench``: train mode end to end on the tiny model (each setup in its own
process), and the parts that must never take the bench down (failed setups, no CUDA)."""
from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch

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
    from memcompile.bench.setups import SETUPS as TABLE, unavailable

    has_prepare = callable(getattr(memcompile, "prepare", None))
    assert (unavailable(TABLE["memtrain_qdylora"]) is None) == has_prepare
    assert unavailable(TABLE["lora"]) is None


def test_setup_table_is_well_formed():
    from memcompile.bench.setups import CONVERGE_DEFAULT, SETUPS as TABLE, TRAIN_DEFAULT, select

    for name, s in TABLE.items():
        assert s.name == name
        assert s.adapter in ("peft", "prepare", "none") and s.compile in ("none", "inductor", "memtrain")
        assert s.optimizer in ("adamw", "fira", "galore")
        assert bool(s.memtrain) == (s.compile == "memtrain")
    assert [s.name for s in select(None, "train", TRAIN_DEFAULT)] == list(TRAIN_DEFAULT)
    assert [s.name for s in select(None, "converge", CONVERGE_DEFAULT)] == list(CONVERGE_DEFAULT)
    with pytest.raises(SystemExit, match="unknown setup"):
        select("lora,nope", "train", TRAIN_DEFAULT)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_kernels_mode_without_cuda_says_so():
    from memcompile.bench.__main__ import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["kernels"]) == []
    assert "kernels mode needs CUDA" in out.getvalue()
