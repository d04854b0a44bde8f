"""backend="memtrain" end to end on CUDA, on small models: the loss and every gradient against the
uncompiled model. Exact paths (no compression, NF4 weights through the Triton dequantisation) must be
bit for bit; compressed layers' weight gradients must be the method's formula (``tests/reference.py``)
computed in fp64 from the eager run's inputs and output gradients; Inductor's fused code is held to fp32
round-off. All marked ``gpu``: ``pytest -m gpu`` (the ``pytest-gpu`` step of ``make gpu-check``).
"""
from __future__ import annotations

import math

import pytest
import torch

import memcompile
from memcompile import activation_state
from memcompile.passes.compression import compact
from tests import models, reference

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _deterministic_attention():
    """SDPA's math kernel: the memory-efficient one (what fp32 gets on CUDA) has a nondeterministic
    backward, which would make two runs of one graph differ in their last bits."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(forward, model, ids):
    """Loss, parameter gradients and the input embeddings' gradient (a leaf, so it is checked too)."""
    model.zero_grad(set_to_none=True)
    x = model.get_input_embeddings()(ids).detach().requires_grad_()
    loss = forward(inputs_embeds=x, labels=ids).loss
    loss.backward()
    return loss.detach(), _grads(model), x.grad.clone()


def _eager(model, ids, capture):
    store, handles = reference.capture(model, capture)
    try:
        return (*_step(model, model, ids), store)
    finally:
        for h in handles:
            h.remove()


def _compiled(model, ids, options):
    return _step(torch.compile(model, backend="memtrain", options=options), model, ids)


def _compressed():
    rep = memcompile.report()
    return rep, [g for g in rep.passes["activation_compression"]["rewritten"]]


def test_no_compression_is_exact_on_cuda():
    model, ids = models.tiny_lora_llama().to(CUDA), models.batch().to(CUDA)
    loss_c, grads_c, xg_c = _compiled(model, ids, {"activation": "none", "compiler": "aot_eager"})
    loss_e, grads_e, xg_e, _ = _eager(model, ids, [])
    assert torch.equal(loss_c, loss_e) and torch.equal(xg_c, xg_e)
    assert grads_c.keys() == grads_e.keys() and len(grads_c) == 28
    for name in grads_e:
        assert torch.equal(grads_c[name], grads_e[name]), name


@pytest.mark.parametrize("method", ["velora", "compact"])
def test_compressed_weight_gradients_are_the_formula_on_cuda(method):
    model, ids = models.tiny_lora_llama().to(CUDA), models.batch().to(CUDA)
    opts = {"activation": method, "compiler": "aot_eager", "velora": {"num_groups": 8, "scale": 0.5},
            "compact": {"rank": 0.25, "seed": 3}}
    loss_c, grads_c, xg_c = _compiled(model, ids, opts)
    rep, groups = _compressed()
    assert groups and rep.bytes_after < rep.bytes_before
    lora_a = [n for n, _ in model.named_modules() if n.endswith("lora_A.default")]
    loss_e, grads_e, xg_e, store = _eager(model, ids, lora_a)
    assert torch.equal(loss_c, loss_e) and torch.equal(xg_c, xg_e)  # outputs and input gradients exact
    compressed = {layer for g in groups for layer in g["layers"]}
    for name in grads_e:
        if name.removesuffix(".weight") not in compressed:
            assert torch.equal(grads_c[name], grads_e[name]), name
    for g in groups:
        for layer in g["layers"]:
            x, go = store[layer]["x"].cpu(), store[layer]["g"].cpu()
            if method == "velora":
                x_hat, _ = reference.velora_x_hat(x, 8, 0.5)
            else:
                # CUDA draws P with the Triton kernel's Philox stream: regenerate it the same way.
                r = g["saved_shape"][1]
                name, block = compact.split_layer(g["layers"][0])
                seed = torch.tensor(compact.layer_seed(name, 3, block))
                p = torch.ops.memtrain.gaussian_sketch(seed, x.shape[1], r, x.dtype, CUDA, 0).cpu().double()
                assert abs(p.var().item() * r - 1) < 6 * math.sqrt(2 / p.numel())
                x_hat = (x.double() @ p) @ p.t()
            expected = reference.linear_wgrad(go, x_hat)
            torch.testing.assert_close(grads_c[layer + ".weight"].cpu().double(), expected, rtol=1e-4, atol=1e-6,
                                       msg=layer)


def _prepared(seed: int = 0):
    model = memcompile.prepare(models.tiny_llama(seed=seed), {"lora": {"r_max": 4, "alpha": 8, "quant": "nf4"}})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
    return model.to(CUDA)


def test_nf4_model_is_exact_on_cuda():
    """NF4 bases dequantised by the Triton kernel in the compiled graph and in eager: the same numbers."""
    model, ids = _prepared(), models.batch().to(CUDA)
    loss_c, grads_c, xg_c = _compiled(model, ids, {"activation": "none", "compiler": "aot_eager"})
    assert len(memcompile.report().quantized_layers) == 14
    loss_e, grads_e, xg_e, _ = _eager(model, ids, [])
    assert torch.equal(loss_c, loss_e) and torch.equal(xg_c, xg_e)
    for name in grads_e:
        assert torch.equal(grads_c[name], grads_e[name]), name


@pytest.mark.slow
def test_everything_on_under_inductor_matches_the_plain_graph_on_cuda():
    """memtrain_all_budget's configuration on a small model: NF4 + DyLoRA, VeLoRA on every linear, the fused
    loss and output projection, a recompute budget, all compiled by Inductor; against the same method's
    graph run op by op without budget or fused loss (the same numbers, up to fp32 round-off)."""
    opts = {"activation": "velora", "targets": ("*",), "velora": {"num_groups": 8}}
    model, ids = _prepared(), models.batch().to(CUDA)
    loss_a, grads_a, xg_a = _compiled(model, ids, {**opts, "compiler": "aot_eager"})
    torch.compiler.reset()
    activation_state.reset()
    loss_b, grads_b, xg_b = _compiled(model, ids, {**opts, "compiler": "inductor", "recompute_budget": 0.05,
                                                   "fused_cross_entropy": True})
    rep = memcompile.report()
    assert rep.passes["block_boundaries"]["counters"]["blocks"] == 2
    assert rep.passes["cross_entropy"]["losses"][0]["linear"] is True
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xg_b, xg_a, rtol=1e-4, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_memory_target_offload_and_recompute_are_exact_on_cuda(compiler):
    """The planner on CUDA: offload (pinned host copies on a side stream) and recompute change nothing
    the step computes, and what stays on the device is under the target."""
    model, ids = models.tiny_lora_llama().to(CUDA), models.batch().to(CUDA)
    opts = {"activation": "none", "compiler": compiler}
    loss_f, grads_f, xg_f = _compiled(model, ids, opts)
    free = memcompile.report().bytes_after
    torch.compiler.reset()
    memcompile.clear_reports()
    target = free // 5
    loss_p, grads_p, xg_p = _compiled(model, ids, {**opts, "memory_target": target})
    rep = memcompile.report()
    assert rep.bytes_after <= target and rep.passes["memory_plan"]["counters"]["offload"] > 0
    # aot_eager runs the same kernels: bit for bit. Inductor fuses the planned graphs differently (the
    # copies' waits are barriers): fp32 round-off.
    same = torch.equal if compiler == "aot_eager" else lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert same(loss_p, loss_f) and same(xg_p, xg_f)
    for name in grads_f:
        assert same(grads_p[name], grads_f[name]), name


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_blocks_head_rebuilds_from_its_input_then_copies_it_on_cuda(compiler, device=CUDA):
    """Under compile_blocks the head's graph (output projection and Hugging Face's loss, no fused loss)
    on CUDA, where host copies are on: its fp32 softmax side is rebuilt in the backward from the final
    hidden states it is passed (a slow host link here makes the copy of it the dearer way), and those
    hidden states, which it then keeps, go to the host to meet its share; the step is unchanged."""

    def run(opts):
        torch.compiler.reset()
        memcompile.clear_reports()
        activation_state.reset()
        model = models.tiny_lora_llama().to(device)
        memcompile.compile_blocks(model, {"activation": "none", "compiler": compiler, **opts})
        ids = models.batch().to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), _grads(model), memcompile.report()

    loss_f, grads_f, rep = run({})
    head = next(g for g in rep.graphs if not g.served)
    target = head.bytes_after // 5 * sum(rep.runs(g) for g in rep.graphs)  # a fifth of the head's, a share
    loss_p, grads_p, rep_p = run({"memory_target": target, "plan": {"offload": True, "host_bytes_per_s": 1e9}})
    plan = next(g for g in rep_p.graphs if not g.served).passes["memory_plan"]
    rebuilt = [r for r in plan.rewritten if r["action"] == "recompute" and r["bytes_after"] > 0]
    copied = {r["tensor"] for r in plan.rewritten if r["action"] == "offload"}
    assert rebuilt and copied and rep_p.bytes_after <= target
    same = torch.equal if compiler == "aot_eager" else lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert same(loss_p, loss_f)
    for name in grads_f:
        assert same(grads_p[name], grads_f[name]), name


def test_memory_target_fp8_is_within_its_bound_on_cuda():
    model, ids = models.tiny_lora_llama().to(CUDA), models.batch().to(CUDA)
    opts = {"activation": "none", "compiler": "inductor"}
    loss_f, grads_f, _ = _compiled(model, ids, opts)
    free = memcompile.report().bytes_after
    torch.compiler.reset()
    memcompile.clear_reports()
    loss_p, grads_p, _ = _compiled(model, ids, {**opts, "memory_target": int(free * 0.7),
                                                "plan": {"fp8": True, "offload": False, "recompute": False}})
    assert memcompile.report().passes["memory_plan"]["counters"]["fp8"] > 0
    torch.testing.assert_close(loss_p, loss_f)
    for name, g in grads_f.items():
        assert ((grads_p[name] - g).norm() / g.norm().clamp_min(1e-30)).item() <= 2 ** -4, name


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_memory_target_reruns_fused_attention_only_without_dropout_on_cuda(dropout):
    """On CUDA attention lowers to a fused kernel that is tagged random for its dropout: the planner may
    offer to rerun it for its output only when its dropout probability is 0."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from memcompile.passes import memory_plan
    from tests.passes.test_memory_plan import _reruns_attention

    model = models.tiny_lora_llama().to(device=CUDA, dtype=torch.bfloat16)
    for layer in model.base_model.model.model.layers:
        layer.self_attn.attention_dropout = dropout
    opts = {"activation": "none", "compiler": "aot_eager"}
    offered = []
    sequence = memory_plan.sequence

    def record(choices):
        offered.extend(choices)  # each saved tensor's cheapest way out, whatever the target
        return sequence(choices)

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]), \
            pytest.MonkeyPatch.context() as mp:
        ids = models.batch().to(CUDA)
        _compiled(model, ids, opts)
        free = memcompile.report().bytes_after
        torch.compiler.reset()
        memcompile.clear_reports()
        mp.setattr(memory_plan, "sequence", record)
        # a slow host link: whatever can be rerun is offered as a rerun
        _compiled(model, ids, {**opts, "memory_target": int(free * 0.9),
                               "plan": {"offload": True, "host_bytes_per_s": 1e3}})
    assert offered and _reruns_attention(offered) == (dropout == 0.0)


def test_compile_blocks_warms_the_kernel_build_pool_before_the_first_step():
    """Inductor builds Triton kernels in this process until its worker pool says it is ready; memtrain
    calls Inductor below Dynamo's inductor backend (which starts the pool), so compile_blocks starts the
    pool and asks for its readiness before any step, and the step's kernels find it ready sooner."""
    from torch._inductor import config as inductor_config
    from torch._inductor.async_compile import AsyncCompile, shutdown_compile_workers

    if inductor_config.compile_threads <= 1:
        pytest.skip("Inductor builds kernels in this process here (compile_threads=1)")
    shutdown_compile_workers()
    assert AsyncCompile._ready_future is None
    memcompile.compile_blocks(models.tiny_lora_llama(layers=2).to(CUDA), {"activation": "velora"})
    assert AsyncCompile._ready_future is not None
    AsyncCompile._ready_future.result(timeout=120)
    assert AsyncCompile.use_process_pool()
