"""FX pass ``swap_nf4_lora``: fires on module calls and functional linears, matches ``prepare`` numerically."""
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from memcompile.adapt import prepare
from memcompile.lora import LoRALinear, RankSampler, set_rank
from memcompile.quant.nf4.lora_pass import swap_nf4_lora
from memcompile.quant.nf4.nf4_quant import nf4_quantize

CFG = {"lora": {"r_max": 4, "alpha": 8.0, "targets": ["q_proj", "w_v", "down"]}}
NF4_LINEAR = torch.ops.memtrain.nf4_linear.default


class Block(nn.Module):
    """A module call (q_proj), a functional linear on a parameter (w_v), an untargeted linear (out)."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(24, 40)
        self.w_v = nn.Parameter(torch.randn(40, 40) * 0.1)
        self.down = nn.Linear(40, 24, bias=False)
        self.out = nn.Linear(24, 8)

    def forward(self, x):
        h = torch.relu(F.linear(self.q_proj(x), self.w_v))
        return self.out(self.down(h) + x)


def _nf4_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == NF4_LINEAR]


def _dense_linears(gm):
    return [n for n in gm.graph.nodes
            if (n.op == "call_module" and type(gm.get_submodule(n.target)) is nn.Linear)
            or (n.op == "call_function" and n.target in (F.linear, torch.ops.aten.linear.default))]


def _randomise_b(module):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.1)


def test_pass_fires_on_symbolic_trace():
    torch.manual_seed(0)
    model = Block()
    w_v = model.w_v.detach().clone()
    gm = fx.symbolic_trace(model)
    assert len(_nf4_calls(gm)) == 0 and len(_dense_linears(gm)) == 4
    result = swap_nf4_lora(gm, CFG)
    assert result.gm is gm and result.counters == {"replaced": 3, "skipped": 0}
    assert {r["target"] for r in result.replaced} == {"q_proj", "w_v_lora", "down"}
    assert len(_nf4_calls(gm)) == 3
    assert len(_dense_linears(gm)) == 1 + 6  # the untargeted `out`, plus A and B of the three adapters
    assert not hasattr(gm, "w_v")  # the dense weight is gone, its codes live in the new layer
    assert torch.equal(gm.w_v_lora.base_layer.weight, nf4_quantize(w_v).packed)
    params = {id(p) for p in result.new_params}
    assert params == {id(getattr(m, ab)) for _, m in gm.named_modules() if isinstance(m, LoRALinear) for ab in
                      ("lora_A", "lora_B")} and len(params) == 6
    assert {n for n, p in gm.named_parameters() if p.requires_grad} == {
        "q_proj.lora_A", "q_proj.lora_B", "w_v_lora.lora_A", "w_v_lora.lora_B", "down.lora_A", "down.lora_B",
        "out.weight", "out.bias"}


def test_pass_output_and_grads():
    torch.manual_seed(0)
    model = Block()
    twin = Block()
    twin.load_state_dict(model.state_dict())
    gm = swap_nf4_lora(fx.symbolic_trace(model), CFG).gm
    twin = prepare(twin, CFG)  # module-level swap: q_proj and down get the same codes as in the graph
    for name in ("q_proj", "down"):
        for k, t in getattr(gm, name).base_layer.state_dict().items():
            assert torch.equal(t, getattr(twin, name).base_layer.state_dict()[k]), (name, k)
    torch.manual_seed(1)
    _randomise_b(gm)
    x = torch.randn(5, 24)
    for b in (4, 2):
        set_rank(gm, b)
        y = gm(x)

        def adapted(layer, h):  # NF4 weight dequantised, adapter truncated to b and scaled by alpha/b
            base = F.linear(h, layer.base_layer.dequantize(), layer.base_layer.bias)
            return base + 8.0 / b * h @ layer.lora_A[:b].t() @ layer.lora_B[:, :b].t()

        ref = gm.out(adapted(gm.down, torch.relu(adapted(gm.w_v_lora, adapted(gm.q_proj, x)))) + x)
        assert torch.allclose(y, ref, atol=1e-5)
    y.sum().backward()
    for layer in (gm.q_proj, gm.w_v_lora, gm.down):
        rows = layer.lora_A.grad.abs().sum(1)
        assert rows[:2].gt(0).all() and rows[2:].eq(0).all()
    sampler = RankSampler(gm, seed=0)
    assert 1 <= sampler.step() <= 4


def test_pass_on_torch_export():
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(3, 24)
    gm = torch.export.export(model, (x,)).module()
    result = swap_nf4_lora(gm, CFG)
    assert len(_nf4_calls(gm)) == 3 and result.counters["replaced"] == 3
    # the emptied parameter containers of torch.export are taken by the layers: same names as prepare()
    assert {r["target"] for r in result.replaced} == {"q_proj", "w_v_lora", "down"}
    assert isinstance(gm.q_proj, LoRALinear) and isinstance(gm.down, LoRALinear)
    y = gm(x)
    reference = swap_nf4_lora(fx.symbolic_trace(model), CFG).gm
    assert torch.allclose(y, reference(x), atol=1e-6)  # adapters start at B = 0: both are the NF4 base


def test_pass_without_targets_changes_nothing():
    gm = fx.symbolic_trace(Block())
    code = gm.code
    result = swap_nf4_lora(gm, {"lora": {"targets": ["nothing_here"]}})
    assert result.counters == {"replaced": 0, "skipped": 0} and result.new_params == []
    assert gm.code == code
