"""``memcompile.quant``: the registry, and a new base plugged in as one implementation (a toy int8
scheme, per-row absmax) that ``prepare``, ``quantized_layers``, ``merge_lora`` and the compile report
then handle with no other change."""
from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import memcompile
from memcompile import quant
from memcompile.ops import memtrain
from memcompile.quant import base


@torch.library.custom_op("memcompile_test::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                shape: list[int]) -> torch.Tensor:
    return F.linear(x, (q.float() * scale[:, None]).to(x.dtype), bias)


@int8_linear.register_fake
def _(x, q, scale, bias, shape):
    return x.new_empty((*x.shape[:-1], shape[0]))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.x_dtype = inputs[0].dtype


def _backward(ctx, grad):
    q, scale = ctx.saved_tensors
    return grad @ (q.float() * scale[:, None]).to(ctx.x_dtype), None, None, None, None


int8_linear.register_autograd(_backward, setup_context=_setup_context)


class Int8Linear(quant.QuantizedLinear):
    def __init__(self, q, scale, bias, dtype):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.weight_dtype = dtype
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x):
        return int8_linear(x, self.weight, self.weight_scale, self.bias, [self.out_features, self.in_features])

    def dequantize(self, dtype=None):
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype or self.weight_dtype)

    @property
    def nbytes(self):
        return self.weight.numel() + 4 * self.weight_scale.numel()

    def describe(self):
        return {"format": "int8"}


class Int8(quant.QuantScheme):
    name = "int8"
    layer = Int8Linear

    def quantize(self, weight, cfg):
        scale = weight.detach().float().abs().amax(1).clamp_min(1e-12) / 127
        return (weight.detach().float() / scale[:, None]).round().to(torch.int8), scale, weight.dtype

    def dequantize(self, state, dtype=None):
        q, scale, orig = state
        return (q.float() * scale[:, None]).to(dtype or orig)

    def from_linear(self, linear, cfg):
        q, scale, dtype = self.quantize(linear.weight, cfg)
        return Int8Linear(q, scale, linear.bias, dtype)

    @property
    def op(self):
        return torch.ops.memcompile_test.int8_linear.default

    def call(self, args):
        return quant.QuantCall(args[0], (args[1], args[2]), args[4])


@pytest.fixture
def int8(monkeypatch):
    monkeypatch.setitem(base._SCHEMES, "int8", Int8())


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 32)
        self.v_proj = nn.Linear(32, 8, bias=False)

    def forward(self, x):
        return self.v_proj(torch.relu(self.q_proj(x)))


def test_registry_names_nf4_and_rejects_unknown_names():
    assert quant.names() == ("nf4",)
    assert quant.for_op(memtrain.nf4_linear.default) is quant.get("nf4")
    assert quant.for_op(torch.ops.aten.mm.default) is None
    with pytest.raises(ValueError, match="unknown quantisation scheme 'int4'; valid: \\('nf4',\\)"):
        quant.get("int4")
    with pytest.raises(ValueError, match="already taken"):
        quant.register(type(quant.get("nf4")))
    with pytest.raises(ValueError, match="'lora.quant'.*valid: 'nf4' \\| 'none'"):
        memcompile.LoRAConfig(quant="int8")


def test_nf4_scheme_round_trips_through_its_layer():
    torch.manual_seed(0)
    linear = nn.Linear(70, 24)
    cfg = memcompile.LoRAConfig()
    nf4 = quant.get("nf4")
    layer = nf4.from_linear(linear, cfg)
    assert isinstance(layer, nf4.layer) and isinstance(layer, quant.QuantizedLinear)
    state = nf4.quantize(linear.weight, cfg)
    assert torch.equal(nf4.dequantize(state), layer.dequantize())
    assert state.nbytes == layer.nbytes
    assert nf4.adopt(linear) is None


def test_new_scheme_is_one_implementation(int8):
    assert memcompile.LoRAConfig(quant="int8").quant == "int8"
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(3, 16)
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    model = memcompile.prepare(model, {"lora": {"quant": "int8", "r_max": 4, "targets": ["q_proj", "v_proj"]}})
    assert all(isinstance(model.get_submodule(n).base_layer, Int8Linear) for n in dense)

    rows = {r["name"]: r for r in memcompile.quantized_layers(model)}
    assert rows["q_proj"] == {"name": "q_proj", "shape": (32, 16), "dtype": "float32", "format": "int8",
                              "bytes_before": 32 * 16 * 4, "bytes_after": 32 * 16 + 4 * 32,
                              "bits_per_weight": 8 * (32 * 16 + 4 * 32) / (32 * 16)}

    eager = model(x)
    compiled = torch.compile(model, backend="memtrain", options={"compiler": "aot_eager", "activation": "none"})
    out = compiled(x)
    out.sum().backward()
    assert torch.allclose(out, eager)
    assert sorted(r["shape"] for r in memcompile.report().quantized_layers) == [(8, 32), (32, 16)]

    merged = memcompile.merge_lora(model)
    assert isinstance(merged.q_proj, nn.Linear)
    for name, w in dense.items():
        assert torch.allclose(merged.get_submodule(name).weight, w, atol=w.abs().max().item() / 127)


def test_import_memcompile_loads_no_scheme_and_no_triton():
    """The built-in schemes load on first use: their ops pull in Triton, which ``import memcompile`` must not."""
    import subprocess
    import sys

    code = ("import sys, memcompile; from memcompile import quant; "
            "print('triton' in sys.modules, 'memcompile.quant.nf4' in sys.modules, quant.names())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "('nf4',)"]
