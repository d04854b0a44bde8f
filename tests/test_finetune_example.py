"""The main job (``make demo``: ``examples/finetune.py``), at a tiny size: one compiled block per layer
under a memory target, batches whose length changes."""
import importlib.util
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_main_job_trains_regional_under_a_memory_target(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("example_finetune", os.path.join(ROOT, "examples", "finetune.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    csv = tmp_path / "run.csv"
    example.main(["--steps", "6", "--base-steps", "3", "--seq", "32", "--min-seq", "24", "--batch", "2",
                  "--compiler", "aot_eager", "--regional", "--memory-target", "200KiB",
                  "--cache-dir", str(tmp_path / "base"), "--csv", str(csv)])
    out = capsys.readouterr().out
    # the first step's report: every layer and the head share the target, and keep it
    assert re.search(r"memory_target 200\.00 KiB: the planned graphs keep [\d.]+ KiB, within it; the compiled "
                     r"layers and the head share it", out), out
    assert "target 66.67 KiB a run (its share of the step's 200.00 KiB)" in out
    losses = [float(line.split(",")[1]) for line in csv.read_text().splitlines()[1:]]
    assert len(losses) == 6 and all(0 < x < 10 for x in losses)
    assert re.search(r"eval loss: \d+\.\d+", out)
