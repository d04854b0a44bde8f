"""Measured reference figures for the baselines, on an H100, that the bench's own runs must reproduce
(within 10 %) and the ``estimate`` mode is checked against.

Setup of the measurements: H100 80GB, torch 2.11.0+cu130, transformers 5.17, peft 0.21.0, bitsandbytes
0.50.2; random bf16 weights, SDPA, LoRA r=16 / alpha 32 / no dropout on the 7 linears, fused AdamW; peak =
``torch.cuda.max_memory_allocated`` over 6 steps, tok/s = median of steps 3-6. Saved GiB: unique storages
packed for backward in one step. Measured 2026-11-23.
"""
from __future__ import annotations

SOURCE = "H100 80GB, torch 2.11, transformers 5.17, peft 0.21, bitsandbytes 0.50.2 (memcompile.bench.anchors)"

# (model, seq, batch) -> setup -> figures. Setup names are the bench's.
FIGURES: dict[tuple[str, int, int], dict[str, dict[str, float]]] = {
    ("tinyllama", 2048, 4): {
        "lora": dict(peak_gib=27.769, tok_per_s=29945, saved_gib=23.075),
        "qlora": dict(peak_gib=26.45, tok_per_s=28188),
        "qlora_gc": dict(peak_gib=5.101, tok_per_s=14746),
        "lora_gc": dict(peak_gib=6.421, tok_per_s=20771),
        "lora_compile": dict(peak_gib=19.869, tok_per_s=45041, saved_gib=16.43),
        "qlora_compile": dict(peak_gib=18.517, tok_per_s=43269),
        "lora_budget": dict(peak_gib=11.834, tok_per_s=36984),  # activation_memory_budget=0.3
    },
    ("llama7b", 2048, 2): {
        "qlora": dict(peak_gib=39.339, tok_per_s=8379),
        "qlora_gc": dict(peak_gib=6.892, tok_per_s=5642),
        "qlora_compile": dict(peak_gib=28.034, tok_per_s=11273),
    },
}


def lookup(setup: str, model: str, seq: int, batch: int) -> dict[str, float] | None:
    """The anchors' figures for ``setup`` at this shape, or ``None``."""
    return FIGURES.get((model, seq, batch), {}).get(setup)
