"""python -m memcompile.inspect: the report of a small example, with and without a memory plan."""
import re

from memcompile import inspect


def _saved_after(text: str) -> float:
    sizes = re.search(r"saved activations: [\d.]+ \w+ -> ([\d.]+) (\w+)", text)
    return float(sizes.group(1)) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[sizes.group(2)]


def test_report_shows_compression_and_the_plan(capsys):
    small = ["--hidden", "64", "--layers", "1", "--seq", "32", "--batch", "1", "--lora-r", "4"]
    inspect.main(small)
    free = capsys.readouterr().out
    assert "pass activation_compression" in free and "memory_plan" not in free
    target = int(_saved_after(free) // 2)
    inspect.main([*small, "--memory-target", str(target), "--offload"])
    planned = capsys.readouterr().out
    assert "pass memory_plan: target" in planned and "offload -> 0 B" in planned
    assert _saved_after(planned) <= target
