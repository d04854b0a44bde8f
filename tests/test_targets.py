"""One meaning for a target pattern: ``targets``/``exclude`` (activation compression) and ``lora.targets``
(``prepare``, the NF4 LoRA graph pass) all match through ``memcompile._targets.matches``."""
import importlib

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from memcompile import _targets
from memcompile._targets import matches
from memcompile.adapt import prepare
from memcompile.config import LLAMA_LINEARS, MemtrainConfig
from memcompile.lora import LoRALinear
from memcompile.passes import activation_compression
from memcompile.quant.nf4 import lora_pass
from tests import models

NAME = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("pattern", [
    NAME, "model.layers.0.*", "*",  # the whole path, by fnmatch
    "q_proj", "self_attn.q_proj", "*_proj", "layers.*.q_proj",  # a dotted suffix, by fnmatch
    "self_attn", "layers.0", "model", "layers.0.self_attn",  # whole components anywhere
])
def test_pattern_matches(pattern):
    assert matches(NAME, [pattern])


@pytest.mark.parametrize("pattern", [
    "proj", "attn", "layers.1", "_proj",  # part of a component is not a component
    "k_proj", "self_attn.k_proj", "mlp",
    "layers.*.self_attn",  # a glob matches the whole path or a suffix, not a middle stretch
])
def test_pattern_does_not_match(pattern):
    assert not matches(NAME, [pattern])


def test_one_matcher_for_every_option():
    assert activation_compression.matches is _targets.matches
    assert lora_pass.matches is _targets.matches
    # ``memcompile.prepare`` is the function; its module is ``memcompile.adapt``.
    assert importlib.import_module("memcompile.adapt").matches is _targets.matches
    # The compression pass's defaults read a pattern the same way (VeLoRA's "lora_A" is a component).
    assert matches(NAME + ".lora_A.default", MemtrainConfig(activation="velora").target_patterns)


def _attention_linears(model):
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".self_attn." in n}


def test_prepare_container_pattern_adapts_the_linears_inside():
    """``"self_attn"`` names the attention module: its four projections are adapted (before the one matcher,
    ``lora.targets`` matched only a path or a suffix, so the container matched and nothing was adapted)."""
    model = models.tiny_llama()
    want = _attention_linears(model)
    prepare(model, {"lora": {"targets": ["self_attn"], "quant": "none", "r_max": 4}})
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == want and len(adapted) == 4 * model.config.num_hidden_layers


def test_prepare_twice_keeps_one_adapter_per_layer():
    """A pattern that names a layer also matches its ``base_layer`` as a component: what lies inside an
    adapter is never adapted again."""
    cfg = {"lora": {"targets": list(LLAMA_LINEARS), "quant": "none", "r_max": 4}}
    model = prepare(models.tiny_llama(), cfg)
    before = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    prepare(model, cfg)
    after = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert after == before and len(after) == 14
    assert all(type(m.base_layer) is nn.Linear for n, m in model.named_modules() if isinstance(m, LoRALinear))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.q = nn.Linear(8, 8)
        self.attn.k = nn.Linear(8, 8)
        self.out = nn.Linear(8, 8)

    def forward(self, x):
        return self.out(self.attn.q(x) + self.attn.k(x))


def test_graph_pass_container_pattern_and_no_adapter_in_adapter():
    gm = fx.symbolic_trace(_Block())
    result = lora_pass.swap_nf4_lora(gm, {"lora": {"targets": ["attn"], "quant": "none", "r_max": 2}})
    assert {r["target"] for r in result.replaced} == {"attn.q", "attn.k"}
    # Trace the adapted module again: "attn" now also names the adapters' own linears and parameters
    # (attn.q.base_layer, attn.q.lora_A), which stay as they are.
    module = _Block()
    prepare(module, {"lora": {"targets": ["attn"], "quant": "none", "r_max": 2}})
    gm = fx.symbolic_trace(module)
    x = torch.randn(3, 8)
    want = gm(x)
    result = lora_pass.swap_nf4_lora(gm, {"lora": {"targets": ["attn"], "quant": "none", "r_max": 2}})
    assert result.replaced == [] and not any(isinstance(m.base_layer, LoRALinear)
                                             for m in gm.modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(gm(x), want)


def test_prepare_container_pattern_on_a_peft_model():
    """On a PEFT model ``"self_attn"`` takes over the four attention adapters; the modules inside PEFT's
    layers (``base_layer``, ``lora_A.default``) are not adapted on their own."""
    pytest.importorskip("peft")
    model = prepare(models.tiny_lora_llama(r=4), {"lora": {"targets": ["self_attn"], "quant": "none", "r_max": 4}})
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj",
                                                                                      "o_proj")}
    assert all(type(m.base_layer) is nn.Linear for n, m in model.named_modules() if isinstance(m, LoRALinear))
