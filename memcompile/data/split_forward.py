"""Run a causal LM as a prefix (once) and a suffix (many times) around one parameter block.

The suffix is the decoder layer that holds the block, the layers after it, the final norm and the
output head. The prefix is everything before: it runs through the model's own ``forward`` until a
forward pre-hook on the first suffix layer records that layer's inputs (hidden states, attention
mask, rotary embeddings, ...) and stops the call. The suffix then calls those submodules directly on
the recorded inputs, so perturbing the block costs only the suffix.

Assumption: all suffix layers take the same keyword inputs as the first one. This holds for the
Llama/Mistral/Qwen/Phi families; it does not hold for models with per-layer masks (sliding-window
layers), so keep the block in the last layer there (the default).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_layer_norm")
_LORA_V_PROJ_B = re.compile(r"\.(\d+)\.self_attn\.v_proj\.lora_B\.([^.]+)\.weight$")


class _PrefixDone(Exception):
    """Raised by the pre-hook to end the prefix forward at the first suffix layer."""


@dataclass
class PrefixCache:
    """What the first suffix layer was called with: hidden states plus the other inputs."""

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def default_block_name(model: nn.Module) -> str:
    """The last decoder layer's ``v_proj`` LoRA B of the active adapter (CoLM's default block)."""
    active = getattr(model, "active_adapter", None)
    best: tuple[int, str] | None = None
    for name, _ in model.named_parameters():
        match = _LORA_V_PROJ_B.search(name)
        if match is None or (isinstance(active, str) and match.group(2) != active):
            continue
        layer = int(match.group(1))
        if best is None or layer > best[0]:
            best = (layer, name)
    if best is None:
        raise ValueError(
            "no '...layers.N.self_attn.v_proj.lora_B.<adapter>.weight' parameter found; "
            "pass param_name, e.g. 'model.layers.1.self_attn.v_proj.weight' for a model without LoRA"
        )
    return best[1]


class ModelSplit:
    """A causal LM cut before the decoder layer that holds ``param_name``.

    Args:
        model: a Hugging Face causal LM (optionally wrapped by PEFT).
        param_name: the block, as in ``model.named_parameters()``. It must live in a decoder layer,
            the final norm or the output head; a block outside the layers cuts before the last layer.
    """

    def __init__(self, model: nn.Module, param_name: str):
        self.model = model
        params = dict(model.named_parameters())
        if param_name not in params:
            raise KeyError(f"{param_name!r} is not a parameter of the model")
        self.param_name = param_name
        self.param = params[param_name]
        modules = dict(model.named_modules())
        layers_name, start = _enclosing_layer(param_name, modules)
        if layers_name is None:
            layers_name = _largest_module_list(modules)
            start = len(modules[layers_name]) - 1
        self.layers: nn.ModuleList = modules[layers_name]
        self.start = start
        decoder = modules[layers_name.rpartition(".")[0]]
        self.norm = next(
            (getattr(decoder, n) for n in _FINAL_NORM_NAMES if isinstance(getattr(decoder, n, None), nn.Module)),
            None,
        )
        if self.norm is None:
            raise ValueError(f"no final norm ({', '.join(_FINAL_NORM_NAMES)}) on {type(decoder).__name__}")
        self.head = _output_head(model)
        suffix = [*self.layers[start:], self.norm, self.head]
        if not any(self.param is p for m in suffix for p in m.parameters()):
            raise ValueError(f"{param_name!r} is not in the decoder layers, final norm or output head")

    def run_prefix(self, inputs: Mapping[str, Any]) -> PrefixCache:
        """Run the model up to the first suffix layer (call under ``no_grad``/``inference_mode``)."""
        captured: dict[str, Any] = {}

        def stop(module, args, kwargs):
            captured["args"], captured["kwargs"] = args, dict(kwargs)
            raise _PrefixDone

        handle = self.layers[self.start].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model(**inputs, use_cache=False)
        except _PrefixDone:
            pass
        finally:
            handle.remove()
        if "args" not in captured:
            raise RuntimeError("the model forward never reached the split layer")
        args, kwargs = captured["args"], captured["kwargs"]
        if args:
            return PrefixCache(hidden=args[0], args=args[1:], kwargs=kwargs)
        return PrefixCache(hidden=kwargs.pop("hidden_states"), args=(), kwargs=kwargs)

    def run_suffix(self, cache: PrefixCache) -> torch.Tensor:
        """Logits from the cached inputs, through the suffix layers, final norm and head."""
        hidden = cache.hidden
        for layer in self.layers[self.start :]:
            out = layer(hidden, *cache.args, **cache.kwargs)
            # Older layer classes return (hidden, attn_weights, ...).
            hidden = out[0] if isinstance(out, tuple) else out
        return self.head(self.norm(hidden))


def _enclosing_layer(param_name: str, modules: dict[str, nn.Module]) -> tuple[str | None, int]:
    # The outermost ModuleList on the path is the decoder stack (inner ones are e.g. MoE experts).
    parts = param_name.split(".")
    for i in range(1, len(parts)):
        parent = ".".join(parts[:i])
        if isinstance(modules.get(parent), nn.ModuleList) and parts[i].isdigit():
            return parent, int(parts[i])
    return None, 0


def _largest_module_list(modules: dict[str, nn.Module]) -> str:
    lists = [
        (sum(p.numel() for p in m.parameters()), name)
        for name, m in modules.items()
        if isinstance(m, nn.ModuleList)
    ]
    if not lists:
        raise ValueError("the model has no decoder layer stack (nn.ModuleList)")
    return max(lists)[1]


def _output_head(model: nn.Module) -> nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output head (get_output_embeddings)")
    return head
