"""End-to-end: tiny Hugging Face models compiled with backend="memtrain" against eager."""
import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import memcompile
from memcompile import activation_state
from memcompile.config import LLAMA_LINEARS
from memcompile.marks import grad_approximation
from memcompile.passes.compression import compact, velora
from tests import models, reference


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(forward, model, ids, embeds):
    """One forward and backward through ``forward``: loss, parameter gradients, input-embedding gradient
    (``embeds``: the embeddings are a leaf input, so their gradient is checked too)."""
    if embeds:
        x = model.get_input_embeddings()(ids).detach().requires_grad_()
        loss = forward(inputs_embeds=x, labels=ids).loss
    else:
        x, loss = None, forward(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), _grads(model), (x.grad.clone() if x is not None else None)


def _compiled_step(model, ids, options, embeds=False):
    return _step(torch.compile(model, backend="memtrain", options=options), model, ids, embeds)


def _eager_step(model, ids, capture_names, embeds=False):
    model.zero_grad(set_to_none=True)
    store, handles = reference.capture(model, capture_names)
    result = _step(model, model, ids, embeds)
    for h in handles:
        h.remove()
    return (*result, store)


def _groups(rep):
    return rep.passes["activation_compression"]["rewritten"]


def _assert_exact_except(grads_c, grads_e, compressed):
    """Every gradient the pass did not approximate equals eager bit for bit."""
    for name in grads_e:
        if name.removesuffix(".weight") not in compressed:
            assert torch.equal(grads_c[name], grads_e[name]), name


def test_no_compression_is_exact():
    model, ids = models.tiny_lora_llama(), models.batch()
    loss_c, grads_c, xg_c = _compiled_step(model, ids, {"activation": "none", "compiler": "aot_eager"}, embeds=True)
    loss_e, grads_e, xg_e, _ = _eager_step(model, ids, [], embeds=True)
    assert torch.equal(loss_c, loss_e)
    assert torch.equal(xg_c, xg_e)
    assert grads_c.keys() == grads_e.keys() and len(grads_c) == 28
    assert all(torch.equal(grads_c[k], grads_e[k]) for k in grads_e)
    rep = memcompile.report()
    assert _groups(rep) == [] and rep.bytes_after == rep.bytes_before


def test_velora_lora_llama_exact_outputs_and_formula_grads():
    model, ids = models.tiny_lora_llama(), models.batch()
    opts = {"activation": "velora", "compiler": "aot_eager", "velora": {"num_groups": 8, "scale": 0.5}}
    loss_c, grads_c, xg_c = _compiled_step(model, ids, opts, embeds=True)
    rep = memcompile.report()
    groups = _groups(rep)
    # LoRA on all 7 linears of 2 layers: q/k/v share one input, gate/up another, down its own; o_proj's
    # input (the attention output) is kept by the attention backward, so compressing it frees nothing.
    assert len(groups) == 6
    assert sorted(len(g["layers"]) for g in groups) == [1, 1, 2, 2, 3, 3]
    o_proj = [s for s in rep.passes["activation_compression"]["skipped"] if "o_proj.lora_A" in s["layer"]]
    assert len(o_proj) == 2 and all(s["reason"].startswith("frees nothing") for s in o_proj)
    lora_a = [n for n, _ in model.named_modules() if n.endswith("lora_A.default")]
    loss_e, grads_e, xg_e, store = _eager_step(model, ids, lora_a, embeds=True)
    assert torch.equal(loss_c, loss_e)
    assert torch.equal(xg_c, xg_e)  # input gradient exact
    compressed = {l for g in groups for l in g["layers"]}
    assert len(compressed) == 12
    _assert_exact_except(grads_c, grads_e, compressed)
    # compressed layers: grad_W = g^T x_hat with v from this (the first) batch, shared within a group
    for g in groups:
        for layer in g["layers"]:
            x_hat, _ = reference.velora_x_hat(store[layer]["x"], 8, 0.5)
            expected = reference.linear_wgrad(store[layer]["g"], x_hat)
            torch.testing.assert_close(grads_c[layer + ".weight"].double(), expected, rtol=1e-4, atol=1e-6)
            assert not torch.allclose(grads_e[layer + ".weight"].double(), expected, atol=1e-4)  # it is an approximation
            param = dict(model.named_parameters())[layer + ".weight"]
            assert grad_approximation(param) == "velora"
    # saved bytes fall by exactly what the method predicts: N*D -> N*G per group, plus each v
    predicted = sum(g["bytes_before"] - g["bytes_after"] - g["state_bytes"] for g in groups)
    assert rep.bytes_before - rep.bytes_after == predicted > 0


def test_compact_full_training_llama_formula_grads():
    model, ids = models.tiny_llama(), models.batch()
    opts = {"activation": "compact", "compiler": "aot_eager", "compact": {"rank": 0.25, "seed": 3}}
    loss_c, grads_c, xg_c = _compiled_step(model, ids, opts, embeds=True)
    rep = memcompile.report()
    groups = _groups(rep)
    assert len(groups) == 6  # per layer: q/k/v, gate/up, down (o_proj excluded as in the paper)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    loss_e, grads_e, xg_e, store = _eager_step(model, ids, linears, embeds=True)
    assert torch.equal(loss_c, loss_e) and torch.equal(xg_c, xg_e)
    compressed = {l for g in groups for l in g["layers"]}
    for g in groups:
        # a seed per group, from its name inside the block and the block's index (no refresh yet)
        name, layer = compact.split_layer(g["layers"][0])
        seed = compact.layer_seed(name, 3, layer)
        r = g["saved_shape"][1]
        assert r == g["shape"][1] // 4
        for layer in g["layers"]:
            x_hat = reference.compact_x_hat(store[layer]["x"], seed, r)
            expected = reference.linear_wgrad(store[layer]["g"], x_hat)
            torch.testing.assert_close(grads_c[layer + ".weight"].double(), expected, rtol=1e-4, atol=1e-6)
    _assert_exact_except(grads_c, grads_e, compressed)


def test_velora_full_training_reports_shared_inputs_that_free_nothing():
    model, ids = models.tiny_llama(), models.batch()
    _compiled_step(model, ids, {"activation": "velora", "compiler": "aot_eager", "velora": {"num_groups": 8}})
    rep = memcompile.report()
    # default VeLoRA targets v_proj and down_proj; v_proj shares its input with q_proj and k_proj
    assert sorted(l for g in _groups(rep) for l in g["layers"]) == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    v = [s for s in rep.passes["activation_compression"]["skipped"] if s["layer"].endswith("v_proj")]
    assert len(v) == 2
    assert all("q_proj (not compressed)" in s["reason"] and "k_proj" in s["reason"] for s in v)
    assert "frees nothing" in str(rep)


def test_layers_keep_their_names_through_a_decorated_forward():
    """A forward wrapped as ``def wrapper(*args, **kwargs)`` (transformers 5.24's models) reaches Dynamo
    with the module as ``L['args'][0]``: its layers keep the names they have under ``L['self']``, which
    CompAct's seeds and the report are keyed by."""
    def passthrough(forward):
        @functools.wraps(forward)
        def wrapper(*args, **kwargs):
            return forward(*args, **kwargs)
        return wrapper

    class Net(torch.nn.Sequential):
        @passthrough
        def forward(self, x):
            return super().forward(x)

    net = Net(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8))
    x = torch.randn(4, 8)
    torch.compile(net, backend="memtrain", options={"activation": "compact", "compiler": "aot_eager",
                                                     "targets": "*", "compact": {"rank": 0.25}})(x).sum().backward()
    assert [l for g in _groups(memcompile.report()) for l in g["layers"]] == ["1"]


def test_gpt2_conv1d_velora_with_padding():
    model, ids = models.tiny_gpt2(), models.batch()
    # 64-wide inputs in 6 groups: sub-tokens of 11, zero-padded to 66 as PEFT does
    opts = {"activation": "velora", "compiler": "aot_eager", "targets": ["c_attn", "c_fc", "mlp.c_proj"],
            "velora": {"num_groups": 6}}
    loss_c, grads_c, _ = _compiled_step(model, ids, opts)
    groups = _groups(memcompile.report())
    layers = sorted(l for g in groups for l in g["layers"])
    assert layers == sorted(f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "mlp.c_fc", "mlp.c_proj"))
    loss_e, grads_e, _, store = _eager_step(model, ids, layers)
    assert torch.equal(loss_c, loss_e)
    for layer in layers:
        x_hat, _ = reference.velora_x_hat(store[layer]["x"], 6, 1.0)
        expected = reference.conv1d_wgrad(store[layer]["g"], x_hat)
        torch.testing.assert_close(grads_c[layer + ".weight"].double(), expected, rtol=1e-4, atol=1e-6)
    _assert_exact_except(grads_c, grads_e, set(layers))


def test_velora_vector_frozen_after_first_batch_and_compact_seed_refresh():
    model = models.tiny_lora_llama()
    compiled = torch.compile(model, backend="memtrain", options={
        "activation": "velora", "compiler": "aot_eager", "velora": {"num_groups": 8}})
    compiled(input_ids=models.batch(seed=1), labels=models.batch(seed=1)).loss.backward()
    first = {k: v.clone() for k, v in velora.vectors(model).items()}
    assert len(first) == 6 and all(k.endswith("lora_A.default.weight") for k in first)
    compiled(input_ids=models.batch(seed=2), labels=models.batch(seed=2)).loss.backward()
    assert all(torch.equal(first[k], v) for k, v in velora.vectors(model).items())
    saved = activation_state.state_dict(model)
    activation_state.reset(model)
    assert velora.vectors(model) == {}
    activation_state.load_state_dict(model, saved)
    assert all(torch.equal(first[k], v) for k, v in velora.vectors(model).items())

    # CompAct: a new projection every `refresh` steps, the same within a step's forward and backward;
    # two owners under one key (one compiled block serving two layers) draw different seeds.
    owner_a, owner_b = torch.zeros(1), torch.zeros(1)
    s0 = [int(compact.compact_seed(torch.zeros(1), owner_a, "mlp", -1, 0, 2)) for _ in range(5)]
    base = compact.layer_seed("mlp", 0, 0)
    assert s0 == [base, base, base + 1, base + 1, base + 2]
    assert int(compact.compact_seed(torch.zeros(1), owner_b, "mlp", -1, 0, 2)) == \
        compact.layer_seed("mlp", 0, 1) != base
    assert compact.split_layer("model.layers.3.mlp.experts.2.w1") == ("mlp.experts.2.w1", 3)


def test_model_without_linear_layers_is_left_alone():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.LayerNorm(8))
    ids = torch.randint(0, 10, (2, 5))
    out = torch.compile(model, backend="memtrain", options={"compiler": "aot_eager"})(ids)
    out.sum().backward()
    g = model[0].weight.grad.clone()
    model.zero_grad()
    ref = model(ids)
    ref.sum().backward()
    assert torch.equal(out, ref) and torch.equal(g, model[0].weight.grad)
    rep = memcompile.report()
    assert _groups(rep) == [] and rep.passes["activation_compression"]["counters"]["groups"] == 0


def test_too_many_groups_is_a_logged_skip():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.randn(3, 4)
    out = torch.compile(model, backend="memtrain", options={
        "compiler": "aot_eager", "targets": "*", "velora": {"num_groups": 16}})(x)
    out.sum().backward()
    skipped = memcompile.report().passes["activation_compression"]["skipped"]
    assert {s["layer"] for s in skipped if "num_groups 16 > input width" in s["reason"]} == {"0", "2"}


def test_report_partitions_the_untouched_graph_only_when_read(tmp_path, monkeypatch):
    """The report's "before" (min-cut again, on the graph without the passes) is not paid for in the
    compile, and when read equals what the same model saves compiled without compression: under
    Inductor, with dropout (random ops the partitioner must handle) and a dynamic length."""
    from memcompile import _torch_compat as tc

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # no compile cache serves these graphs

    def before_runs() -> float:
        return tc.compile_phase_seconds().get("memtrain.report_before", 0.0)

    def train(activation):
        memcompile.clear_reports()
        torch.manual_seed(0)
        model = models.tiny_lora_llama(layers=1, attention_dropout=0.25)
        compiled = torch.compile(model, backend="memtrain", dynamic=True,
                                 options={"activation": activation, "compiler": "inductor"})
        for t in (12, 16):
            compiled(input_ids=models.batch(t=t), labels=models.batch(t=t)).loss.backward()
        return memcompile.report()

    spent = before_runs()
    rep = train("velora")
    assert before_runs() == spent  # nothing read yet: the compile did not partition twice
    assert len(memcompile.reports()) == 1 and _groups(rep)
    before = rep.bytes_before
    assert before_runs() > spent
    plain = train("none")
    assert before == plain.bytes_after > rep.bytes_after
    assert [t.shape for t in rep.saved_before] == [t.shape for t in plain.saved_after]


def test_inference_graph_is_reported_and_untouched():
    model, ids = models.tiny_llama(layers=1), models.batch()
    with torch.no_grad():
        out = torch.compile(model, backend="memtrain", options={"compiler": "aot_eager"})(input_ids=ids).logits
        ref = model(input_ids=ids).logits
    assert torch.equal(out, ref)
    assert memcompile.report().inference


def test_graph_breaks_count_every_graph_as_often_as_it_runs():
    """A graph break before every decoder layer: Dynamo compiles the layers' frame once per layer (and
    the rest around them). The step's report counts each graph as many times as it ran in the step,
    so its total stays near the unbroken model's (it was about a layer's worth when each frame counted
    once); an evaluation under no_grad afterwards does not replace the training step."""
    def saved_after(breaks: bool, layers: int = 3):
        torch.compiler.reset()
        memcompile.clear_reports()
        model = models.tiny_lora_llama(layers=layers)
        if breaks:
            for layer in model.base_model.model.model.layers:
                layer.register_forward_pre_hook(lambda module, args: torch._dynamo.graph_break())
        compiled = torch.compile(model, backend="memtrain", options={"activation": "velora", "compiler": "aot_eager"})
        for seed in (0, 1):
            ids = models.batch(seed=seed)
            compiled(input_ids=ids, labels=ids).loss.backward()
        rep = memcompile.report()
        with torch.no_grad():
            compiled(input_ids=ids)
        assert memcompile.report().bytes_after == rep.bytes_after and not memcompile.report().inference
        return rep

    whole = saved_after(breaks=False)
    split = saved_after(breaks=True)
    assert len(whole.graphs) == 1 and len(split.graphs) > 3
    frames = {}
    for g in split.graphs:
        frames[g.frame_id] = frames.get(g.frame_id, 0) + split.runs(g)
    assert 3 in frames.values()  # the layers' frame: 3 runs a step, however many graphs it compiled
    once_per_frame = sum({g.frame_id: g.bytes_after for g in split.graphs}.values())
    assert once_per_frame < 0.6 * whole.bytes_after  # what counting each frame's latest graph once gave
    assert 0.85 * whole.bytes_after <= split.bytes_after <= whole.bytes_after


def test_a_graph_that_runs_once_per_layer_counts_once_per_layer():
    """A break at the top of a block's forward: Dynamo compiles the rest of the block once and runs it
    for every block; the step's report counts it three times and says so."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

        def forward(self, x):
            torch._dynamo.graph_break()
            return x + self.b(torch.relu(self.a(x)))

    blocks = torch.nn.Sequential(Block(), Block(), Block())
    compiled = torch.compile(blocks, backend="memtrain", options={"compiler": "aot_eager"})
    for _ in range(3):
        compiled(torch.randn(4, 16)).sum().backward()
    rep = memcompile.report()
    relu = 4 * 32 * 4  # each block saves its relu output
    assert sum(rep.runs(g) for g in rep.graphs) == 3 and rep.bytes_after == 3 * relu
    assert any(rep.runs(g) > 1 for g in rep.graphs) == ("times a step" in str(rep))


def test_unknown_backend_arguments_are_errors():
    with pytest.raises(ValueError, match="not mode"):
        memcompile.memtrain(None, [], mode="max-autotune")
    with pytest.raises(ValueError, match="unknown memtrain option 'actvation'"):
        memcompile.memtrain(None, [], options={"actvation": "velora"})


@pytest.mark.slow
def test_inductor_lora_llama_velora_matches_formula():
    model, ids = models.tiny_lora_llama(layers=1), models.batch()
    opts = {"activation": "velora", "compiler": "inductor", "velora": {"num_groups": 8}}
    loss_c, grads_c, xg_c = _compiled_step(model, ids, opts, embeds=True)
    rep = memcompile.report()
    groups = _groups(rep)
    assert len(groups) == 3 and rep.bytes_after < rep.bytes_before
    lora_a = [n for n, _ in model.named_modules() if n.endswith("lora_A.default")]
    loss_e, grads_e, xg_e, store = _eager_step(model, ids, lora_a, embeds=True)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xg_c, xg_e, rtol=1e-4, atol=1e-6)
    compressed = {l for g in groups for l in g["layers"]}
    for name, grad in grads_e.items():
        layer = name.removesuffix(".weight")
        if layer in compressed:
            x_hat, _ = reference.velora_x_hat(store[layer]["x"], 8, 1.0)
            grad = reference.linear_wgrad(store[layer]["g"], x_hat)
        torch.testing.assert_close(grads_c[name].double(), grad.double(), rtol=1e-4, atol=1e-5)


def test_entry_point_works_without_importing_memcompile(tmp_path):
    script = textwrap.dedent("""
        import sys, torch
        assert "memcompile" not in sys.modules
        assert "memtrain" in torch.compiler.list_backends(exclude_tags=())
        m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
        x = torch.randn(4, 8)
        y = torch.compile(m, backend="memtrain", options={"compiler": "aot_eager", "targets": "*",
                                                          "velora": {"num_groups": 4}})(x)
        y.sum().backward()
        assert torch.allclose(y, m(x))
        import memcompile
        groups = memcompile.report().passes["activation_compression"]["rewritten"]
        print("groups", len(groups), "imported", "memcompile" in sys.modules)
    """)
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "groups 1 imported True" in out.stdout


def test_bf16_base_with_fp32_adapters_shares_one_compressed_copy():
    """PEFT casts the bf16 input to the fp32 adapters once per adapter; q/k/v's casts are one group."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(models.tiny_llama(layers=1).to(torch.bfloat16),
                           LoraConfig(r=4, lora_alpha=8, target_modules=list(LLAMA_LINEARS)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    ids = models.batch()
    loss_c, grads_c, _ = _compiled_step(model, ids, {"compiler": "aot_eager", "velora": {"num_groups": 8}})
    rep = memcompile.report()
    groups = _groups(rep)
    assert sorted(len(g["layers"]) for g in groups) == [1, 1, 2, 3]  # qkv, o, gate/up, down
    assert all(g["dtype"] == "float32" for g in groups)
    assert rep.bytes_before - rep.bytes_after == rep.predicted_saving > 0
    lora_a = [n for n, _ in model.named_modules() if n.endswith("lora_A.default")]
    loss_e, grads_e, _, store = _eager_step(model, ids, lora_a)
    assert torch.equal(loss_c, loss_e)
    for layer in lora_a:
        x_hat, _ = reference.velora_x_hat(store[layer]["x"].float(), 8, 1.0)
        expected = reference.linear_wgrad(store[layer]["g"].float(), x_hat)
        torch.testing.assert_close(grads_c[layer + ".weight"].double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["velora", "compact"])
def test_dynamic_token_count_compresses_and_matches_formula(method):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    compiled = torch.compile(model, backend="memtrain", dynamic=True, options={
        "compiler": "aot_eager", "activation": method, "targets": "*", "velora": {"num_groups": 4},
        "compact": {"rank": 8, "refresh": 1000}})
    for step, n in enumerate((5, 7, 9)):
        model.zero_grad()
        x = torch.randn(n, 16)
        y = compiled(x)
        y.sum().backward()
        assert torch.equal(y, model(x))
        h = torch.nn.functional.gelu(model[0](x)).detach()
        g = torch.ones(n, 16)
        if method == "velora":
            x_hat, _ = reference.velora_x_hat(h, 4, 1.0, v=velora.vectors(model)["2.weight"])
        else:
            x_hat = reference.compact_x_hat(h, compact.layer_seed("", 0, 2), 8)  # layer "2" of the Sequential
        torch.testing.assert_close(model[2].weight.grad.double(), reference.linear_wgrad(g, x_hat), rtol=1e-4, atol=1e-6)
    reps = memcompile.reports()
    assert len(reps) == 1  # one compile serves every token count
    assert [r["layers"] for r in reps[0].passes["activation_compression"]["rewritten"]] == [["2"]]
    assert reps[0].bytes_after < reps[0].bytes_before


@pytest.mark.parametrize("method", ["velora", "compact"])
def test_recompute_budget_saves_less_and_changes_no_gradient(method):
    """Under a budget the partitioner recomputes some saved tensors; the graph computes the same
    numbers, so loss and gradients equal the unbudgeted run's, and fewer bytes are saved."""
    opts = {"activation": method, "compiler": "aot_eager", "targets": ("*",), "compact": {"seed": 3}}
    model, ids = models.tiny_lora_llama(), models.batch()
    loss_a, grads_a, _ = _compiled_step(model, ids, opts)
    full = memcompile.report()
    torch.compiler.reset()
    activation_state.reset()
    model.zero_grad(set_to_none=True)
    loss_b, grads_b, _ = _compiled_step(model, ids, {**opts, "recompute_budget": 0.05})
    budgeted = memcompile.report()
    assert len(_groups(budgeted)) == len(_groups(full)) > 0  # compression still fired
    # The residual stream into layer 1 (layer 0 reads the embedding, made outside every layer) and the
    # rotary tables made once outside the layers and read by both.
    assert budgeted.passes["block_boundaries"]["counters"]["blocks"] == 2
    assert "block_boundaries" not in full.passes
    assert budgeted.bytes_after < full.bytes_after
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)


def test_recompute_budget_needs_mincut():
    with pytest.raises(ValueError, match="recompute_budget"):
        memcompile.MemtrainConfig(recompute_budget=0.5, partitioner="default")
    with pytest.raises(ValueError, match="recompute_budget"):
        memcompile.MemtrainConfig(recompute_budget=0)


def test_inductor_recompute_budget_and_fused_loss_match_the_plain_graph():
    """The GPU path with everything on: Inductor compiles the budgeted partition with the fused loss and
    output projection; the numbers are the plain graph's, up to fp32 round-off."""
    opts = {"activation": "velora", "targets": ("*",), "velora": {"num_groups": 8}}
    model, ids = models.tiny_lora_llama(), models.batch()
    loss_a, grads_a, _ = _compiled_step(model, ids, {**opts, "compiler": "aot_eager"})
    torch.compiler.reset()
    activation_state.reset()
    model.zero_grad(set_to_none=True)
    loss_b, grads_b, _ = _compiled_step(model, ids, {**opts, "compiler": "inductor", "recompute_budget": 0.05,
                                                     "fused_cross_entropy": True})
    rep = memcompile.report()
    assert rep.passes["block_boundaries"]["counters"]["blocks"] == 2 and _groups(rep)
    assert rep.passes["cross_entropy"]["losses"][0]["linear"] is True
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)
