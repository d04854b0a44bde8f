"""Tiny random Llama models and pools shared by the coreset tests."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 64


def _config(layers: int = 2) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


@pytest.fixture
def make_llama():
    """``make_llama(seed, dtype, lora=False)``: a tiny random causal LM, PEFT LoRA on q/v if asked.

    LoRA B starts at zero in PEFT; it is randomised here so its gradients are not degenerate.
    """

    def build(seed: int = 0, dtype: torch.dtype = torch.float64, lora: bool = False, dropout: float = 0.0):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(_config()).to(dtype)
        if lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=dropout)
            )
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(std=0.1)
        return model

    return build


@pytest.fixture
def make_pool():
    """``make_pool(sources, seq=10, seed=0)``: random token rows, right padding on every third row."""

    def build(sources, seq: int = 10, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        n = len(sources)
        ids = torch.randint(0, VOCAB, (n, seq), generator=g)
        mask = torch.ones(n, seq, dtype=torch.long)
        mask[::3, seq - 3 :] = 0
        return {"input_ids": ids, "attention_mask": mask, "sources": torch.tensor(sources)}

    return build


@pytest.fixture
def reference_gradients():
    """``reference_gradients(model, param, pool)``: per-example gradients of ``param`` through the
    model's own forward and loss, one full backward per example (independent of the split path)."""
    from memcompile.data import causal_lm_labels

    def compute(model, param, pool):
        labels = causal_lm_labels(pool)
        rows = []
        for i in range(labels.shape[0]):
            out = model(
                input_ids=pool["input_ids"][i : i + 1],
                attention_mask=pool["attention_mask"][i : i + 1],
                labels=labels[i : i + 1],
            )
            (g,) = torch.autograd.grad(out.loss, param)
            rows.append(g.reshape(-1))
        return torch.stack(rows)

    return compute
