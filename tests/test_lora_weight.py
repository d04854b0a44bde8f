"""``LoRALinear.weight``/``.bias``: what a model that reads its layers' weights directly gets.

Routers check ``gate.weight.dtype``, Mamba computes ``dt_proj.weight @ x``: after ``prepare`` that must
give the layer's actual weight (the base, dequantised when NF4, plus the adapter), and the adapter must
get the gradient it gets through ``forward``.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import memcompile


def _prepared(quant: str, frozen: bool, rank: int):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(64, 32))
    memcompile.prepare(model, {"lora": {"targets": ["proj"], "r_max": 4, "alpha": 8, "quant": quant,
                                        "frozen": frozen}})
    layer = model.proj
    assert isinstance(layer, memcompile.LoRALinear)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    layer.set_rank(rank)
    return layer


@pytest.mark.parametrize("quant", ["none", "nf4"])
@pytest.mark.parametrize("frozen", [False, True])
def test_weight_is_the_layer_the_forward_applies(quant, frozen):
    layer = _prepared(quant, frozen, rank=3)
    x = torch.randn(5, 64)

    y_fwd = layer(x)
    y_fwd.square().sum().backward()
    grads_fwd = (layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    layer.zero_grad(set_to_none=True)

    assert layer.weight.shape == (32, 64) and layer.weight.dtype == torch.float32
    y_w = F.linear(x, layer.weight, layer.bias)
    y_w.square().sum().backward()
    torch.testing.assert_close(y_w, y_fwd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad, grads_fwd[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, grads_fwd[1], rtol=1e-4, atol=1e-5)
    assert layer.lora_B.grad.abs().sum() > 0
    if frozen:  # DyLoRA's frozen mode: only feature rank-1 trains, through .weight as through forward
        assert layer.lora_A.grad[:2].abs().sum() == 0 and layer.lora_A.grad[2].abs().sum() > 0


def test_weight_of_nf4_layer_is_dequantised_base_plus_adapter():
    layer = _prepared("nf4", frozen=False, rank=4)
    expected = layer.base_layer.dequantize() + layer.delta_weight()
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=0, atol=1e-6)
    assert layer.bias is layer.base_layer.bias
