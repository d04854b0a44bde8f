"""The pass on its own, on a joint graph from AOTAutograd: structure of the rewritten graph."""
import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from memcompile import MemtrainConfig
from memcompile._targets import matches
from memcompile._torch_compat import aot_autograd, make_boxed_func, min_cut_rematerialization_partition
from memcompile.passes.activation_compression import compress_activations

aten = torch.ops.aten


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _joint_graph(model, x, edit):
    """Compile with a partition_fn that hands the joint graph to ``edit`` before min-cut."""
    seen = {}

    def partition(joint, inputs, **kw):
        seen["before"] = fx.GraphModule(joint, joint.graph.__deepcopy__())
        seen["result"] = edit(joint)
        seen["after"] = joint
        fw, bw = min_cut_rematerialization_partition(joint, inputs, **kw)
        seen["fw"] = fw
        return fw, bw

    boxed = lambda gm, ex: make_boxed_func(gm.forward)  # noqa: E731
    out = torch.compile(model, backend=aot_autograd(fw_compiler=boxed, bw_compiler=boxed, partition_fn=partition))(x)
    out.sum().backward()
    return seen, out


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_velora_rewrites_the_weight_gradient_matmul():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 16)
    # without parameter names, layers are named by their graph placeholders: target them all
    cfg = MemtrainConfig(activation="velora", targets=("*",), velora={"num_groups": 4})
    seen, out = _joint_graph(model, x, lambda g: compress_activations(g, cfg))
    before, after, result = seen["before"], seen["after"], seen["result"]
    # x of `up` is a graph input (nothing to free); `down`'s input (the gelu output) is compressed
    assert len(result.rewritten) == 1 and result.rewritten[0]["input"].startswith("gelu")
    assert result.rewritten[0]["saved_shape"] == (4, 4)
    assert torch.ops.memtrain.velora_vector.default in _targets(after)
    assert torch.ops.memtrain.velora_vector.default not in _targets(before)
    # the op that reads the layer's state is saved, never recomputed, and reads the layer's own weight
    state = next(n for n in after.graph.nodes if n.target == torch.ops.memtrain.velora_vector.default)
    assert state.meta["recompute"] == CheckpointPolicy.MUST_SAVE
    assert state.args[1].op == "placeholder"
    bwd_mm = lambda gm: sum(1 for n in gm.graph.nodes  # noqa: E731
                            if n.target == aten.mm.default and n.meta.get("partitioner_tag") == "is_backward")
    # the weight-gradient mm(t(g), gelu) became mm(t(g), z): same count, but none reads the gelu output
    gelu = next(n for n in after.graph.nodes if n.target == aten.gelu.default)
    assert not any(u.meta.get("partitioner_tag") == "is_backward" and u.target == aten.mm.default
                   for v in [gelu] + list(gelu.users) for u in v.users)
    assert bwd_mm(after) == bwd_mm(before)
    saved = [n.name for n in next(n for n in seen["fw"].graph.nodes if n.op == "output").args[0][1:]]
    assert not any(s.startswith("gelu") for s in saved)
    assert torch.equal(out, model(x))


def test_pass_with_activation_none_leaves_the_graph_alone():
    model, x = MLP(), torch.randn(4, 16)
    seen, _ = _joint_graph(model, x, lambda g: compress_activations(g, MemtrainConfig(activation="none")))
    assert str(seen["before"].graph) == str(seen["after"].graph)
    assert seen["result"].rewritten == []


def test_graph_input_is_skipped_with_reason():
    model, x = MLP(), torch.randn(4, 16)
    cfg = MemtrainConfig(activation="compact", targets=("*",))
    seen, _ = _joint_graph(model, x, lambda g: compress_activations(g, cfg))
    reasons = {s["reason"] for s in seen["result"].skipped}
    assert any("graph input" in r for r in reasons)
    assert len(seen["result"].rewritten) == 1
    assert torch.ops.memtrain.gaussian_sketch.default in _targets(seen["after"])
    seed = next(n for n in seen["after"].graph.nodes if n.target == torch.ops.memtrain.compact_seed.default)
    assert seed.meta["recompute"] == CheckpointPolicy.MUST_SAVE


def test_matches():
    assert matches("model.layers.0.self_attn.q_proj.lora_A.default", ["lora_A"])
    assert matches("model.layers.0.mlp.down_proj", ["down_proj"])
    assert matches("transformer.h.1.mlp.c_proj", ["mlp.c_proj"])
    assert not matches("transformer.h.1.attn.c_proj", ["mlp.c_proj"])
    assert matches("model.layers.3.self_attn.v_proj", ["model.layers.3.*"])
    assert not matches("model.layers.0.self_attn.v_proj", ["k_proj"])


def test_cache_key_changes_with_options_and_layer_names():
    from memcompile.pipeline import cache_key as uuid

    base = uuid(MemtrainConfig(), ["a.weight"])
    assert base == uuid(MemtrainConfig(), ["a.weight"])
    assert base != uuid(MemtrainConfig(velora={"num_groups": 8}), ["a.weight"])
    assert base != uuid(MemtrainConfig(activation="compact"), ["a.weight"])
    assert base != uuid(MemtrainConfig(), ["b.weight"])
