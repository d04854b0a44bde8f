"""Models by name: Llama shapes (or a Hugging Face config's) with random weights, identical in every
setup's process.

Each shape is written once to a checkpoint in the temp directory and every setup loads that file, so
the quantised setups go through the path users take (``from_pretrained`` with a
``BitsAndBytesConfig``), as the anchor measurements did, and all setups start from the same weights.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

import torch

# The anchors' shapes (/work/shared/anchors/bench_anchors.py), plus a tiny one for CPU runs and CI.
MODELS: dict[str, dict] = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000),
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32000),
    # Llama-3.1-8B (the long-context anchor's model): grouped-query attention, a 128k vocabulary, RoPE base
    # 500k. Its llama3 RoPE scaling changes no shape, so it is left out.
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                    max_position_embeddings=131072),
    # Grouped-query attention like TinyLlama's, at a size that trains in milliseconds on a CPU core. The
    # MLP width is a multiple of 64: bitsandbytes' CPU inference path (eval mode) fails on other widths.
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}


def model_name(name: str) -> str:
    """``name`` if it is a shape of ``MODELS`` or a path to a Hugging Face config; else a ``ValueError``."""
    if name in MODELS or os.path.exists(name):
        return name
    raise ValueError(f"unknown model {name!r}: a shape ({', '.join(MODELS)}) or a Hugging Face config.json "
                     "(or the folder holding one)")


def model_config(name: str):
    """The config of a shape of ``MODELS`` (a Llama), or of a Hugging Face ``config.json`` (or the folder
    holding one): a causal LM whose linears carry Llama's names for the LoRA setups (Llama, Mistral,
    Qwen2, Qwen3, ...), at its own sizes, with random weights."""
    from transformers import AutoConfig, LlamaConfig

    if model_name(name) in MODELS:
        return LlamaConfig(**{"max_position_embeddings": 4096, **MODELS[name]}, bos_token_id=1, eos_token_id=2)
    return AutoConfig.from_pretrained(name)


def build(config):
    """A causal LM of ``config``'s architecture (on the current default device)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def checkpoint(name: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> str:
    """Directory of the random-weight checkpoint of ``name`` (written on first use)."""
    config = model_config(name)
    # The config's hash in the name: editing a shape above (or the config file) must not reuse the old checkpoint.
    shape = hashlib.sha1(config.to_json_string(use_diff=False).encode()).hexdigest()[:8]
    label = name if name in MODELS else "config"
    path = os.path.join(tempfile.gettempdir(), f"memcompile-bench-{label}-{shape}-{_dtype_name(dtype)}-seed{seed}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(seed)
    # Built on the device: initialising a 7B model on the CPU takes minutes.
    with torch.device(device):
        model = build(config).to(dtype)
    # Written beside the final path and renamed, so a run killed mid-write leaves no half checkpoint.
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".", dir=os.path.dirname(path))
    model.save_pretrained(tmp)
    del model
    try:
        os.rename(tmp, path)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load(name: str, dtype: torch.dtype, device: torch.device, quant: bool = False, seed: int = 0):
    """The model in training mode, KV cache off; ``quant`` loads the base in bitsandbytes NF4 (double quant)."""
    from transformers import AutoModelForCausalLM

    kw = dict(dtype=dtype, device_map={"": device.index if device.type == "cuda" else device.type},
              attn_implementation="sdpa")
    if quant:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(checkpoint(name, dtype, device, seed), **kw)
    model.config.use_cache = False
    model.train()
    return model


def bnb_4bit_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why bitsandbytes NF4 cannot run on ``device`` (``None`` when a quantise/dequantise round trip works)."""
    try:
        import bitsandbytes.functional as bnbf

        w = torch.randn(64, 64, device=device, dtype=dtype)
        q, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        bnbf.dequantize_4bit(q, state)
    except Exception as e:  # any failure means the setup cannot run here; say which
        return f"bitsandbytes 4-bit does not work on {device.type}: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return None


def random_tokens(vocab: int, batch: int, seq: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=gen).to(device)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def device_and_defaults(args, gpu_defaults: dict, cpu_defaults: dict) -> torch.device:
    """The device a mode runs on; flags the user left unset take that device's defaults."""
    device = default_device()
    for key, value in (gpu_defaults if device.type == "cuda" else cpu_defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return device


def train_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, as the anchors; fp32 on CPU, where bf16 matmuls are slow and lose the comparison."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def meta_model(name: str, dtype: torch.dtype, device: str = "meta"):
    """``name``'s model without its weights: on the meta device (shapes and dtypes only, nothing
    allocated), or with ``device="cpu"`` allocated and filled with a constant, for code that must read
    values (quantisation) before the model moves to the meta device. Training mode, KV cache off."""
    with torch.device("meta"):
        model = build(model_config(name)).to(dtype)
    if device != "meta":
        model = model.to_empty(device=device)
        with torch.no_grad():
            for t in (*model.parameters(), *model.buffers()):
                t.fill_(0.01)  # any finite non-zero value: quantisers divide by block maxima
    model.config.use_cache = False
    model.train()
    return model
