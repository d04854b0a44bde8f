"""Tiny random Hugging Face models for the tests (no download)."""
from __future__ import annotations

import torch

from memcompile.config import LLAMA_LINEARS


def tiny_llama(layers: int = 2, hidden: int = 64, inter: int = 128, vocab: int = 128, seed: int = 0,
               attention_dropout: float = 0.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab,
                      max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      attention_dropout=attention_dropout)
    return LlamaForCausalLM(cfg)


def tiny_lora_llama(r: int = 4, seed: int = 0, **kw):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(seed=seed, **kw), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                                   target_modules=list(LLAMA_LINEARS)))
    # PEFT starts B at zero; random B makes the A gradients (the compressed ones) non-zero.
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert len(lora_b) == len(LLAMA_LINEARS) * model.config.num_hidden_layers, "PEFT missed target modules"
    with torch.no_grad():
        for p in lora_b:
            p.normal_(std=0.05)
    return model


def tiny_gpt2(layers: int = 2, hidden: int = 64, vocab: int = 128, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, vocab_size=vocab, n_positions=128,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    model = GPT2LMHeadModel(cfg)
    model.loss_type = "ForCausalLM"  # GPT-2 derives loss_type=None, whose warning breaks the graph
    return model


def batch(vocab: int = 128, b: int = 2, t: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (b, t), generator=g)
