"""Regional compilation: one compiled block for every layer, each layer keeping its own compression
state, against the whole model compiled at once."""
import copy
import functools
import inspect
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import memcompile
from memcompile import _torch_compat as tc
from memcompile import activation_state
from memcompile.config import LLAMA_LINEARS
from memcompile.passes.compression import velora
from tests import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(model, forward, steps, seed0=0, t=16):
    """Loss and every parameter gradient of each step (SGD updates in between, so later steps see
    moved weights and state)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    history = []
    for step in range(steps):
        ids = models.batch(seed=seed0 + step, t=t)
        opt.zero_grad(set_to_none=True)
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        history.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        opt.step()
    return history


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
    assert len(a) == len(b)
    for (loss_a, grads_a), (loss_b, grads_b) in zip(a, b):
        torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
        assert grads_a.keys() == grads_b.keys()
        for name in grads_a:
            torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)


def _whole_and_regional(build, opts, steps):
    model = build()
    whole = _train(model, torch.compile(model, backend="memtrain", options=opts), steps)
    whole_state = activation_state.state_dict(model)
    torch.compiler.reset()
    activation_state.reset()
    memcompile.clear_reports()
    model = build()
    memcompile.compile_blocks(model, opts)
    graphs = tc.dynamo_graph_count()
    regional = _train(model, model, steps)
    assert tc.dynamo_graph_count() - graphs == 2  # one block graph for every layer, and the loss
    return whole, regional, whole_state, activation_state.state_dict(model)


@pytest.mark.parametrize("method", ["velora", "compact"])
def test_regional_equals_whole_model_peft_lora(method):
    """Several steps, across CompAct refreshes (refresh 2, 3 steps): the same losses and gradients,
    every parameter, and each layer's own state (3 layers: 3 different VeLoRA vectors per group)."""
    opts = {"activation": method, "compiler": "aot_eager", "velora": {"num_groups": 8},
            "compact": {"rank": 8, "refresh": 2, "seed": 5}}
    whole, regional, s_whole, s_regional = _whole_and_regional(lambda: models.tiny_lora_llama(layers=3), opts, 3)
    _assert_same(whole, regional)
    rep = memcompile.report()
    block = [g for g in rep.graphs if g.served]
    assert len(block) == 1 and len(block[0].served) == 3
    assert block[0].passes["activation_compression"]["rewritten"]
    # state per layer: keyed by the model's own parameter names, the same in both runs
    assert s_whole.keys() == s_regional.keys() and len(s_whole) == 9
    for name, s in s_whole.items():
        if method == "velora":
            assert torch.equal(s["velora_v"], s_regional[name]["velora_v"])
        else:
            assert s["compact_calls"] == s_regional[name]["compact_calls"] == 3
            assert s["compact_seed"] == s_regional[name]["compact_seed"]
    per_layer = [s_regional[f"base_model.model.model.layers.{i}.mlp.down_proj.lora_A.default.weight"] for i in range(3)]
    if method == "velora":
        assert not torch.equal(per_layer[0]["velora_v"], per_layer[1]["velora_v"])
    else:
        assert len({s["compact_seed"] for s in per_layer}) == 3


def test_regional_equals_whole_model_prepared_nf4_compact():
    from memcompile import prepare

    def build():
        model = prepare(models.tiny_llama(layers=2, hidden=64, inter=128),
                        memcompile.MemtrainConfig(lora={"r_max": 4, "targets": LLAMA_LINEARS}))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(std=0.05)
        return model

    opts = {"activation": "compact", "compiler": "aot_eager", "targets": ["*"], "compact": {"rank": 8, "refresh": 2}}
    whole, regional, _, _ = _whole_and_regional(build, opts, 3)
    _assert_same(whole, regional)
    assert memcompile.report().passes["activation_compression"]["rewritten"]


def test_regional_equals_whole_model_qwen2_velora():
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def build():
        torch.manual_seed(0)
        cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
        model = get_peft_model(Qwen2ForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=list(LLAMA_LINEARS)))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05)
        return model

    opts = {"activation": "velora", "compiler": "aot_eager", "velora": {"num_groups": 8}}
    whole, regional, _, _ = _whole_and_regional(build, opts, 2)
    _assert_same(whole, regional)


def test_two_models_with_the_same_names_keep_their_own_state():
    """Two models in one process, compiled block by block: neither sees the other's VeLoRA vectors."""
    opts = {"activation": "velora", "compiler": "aot_eager", "velora": {"num_groups": 8}}
    alone = models.tiny_lora_llama(seed=1)
    memcompile.compile_blocks(alone, opts)
    _train(alone, alone, 1, seed0=10)
    expected = velora.vectors(alone)
    torch.compiler.reset()
    activation_state.reset()

    first, second = models.tiny_lora_llama(seed=0), models.tiny_lora_llama(seed=1)
    memcompile.compile_blocks(first, opts)
    memcompile.compile_blocks(second, opts)
    _train(first, first, 1, seed0=20)
    _train(second, second, 1, seed0=10)
    got = velora.vectors(second)
    assert got.keys() == expected.keys() and len(got) == 6
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert not torch.equal(velora.vectors(first)[next(iter(got))], got[next(iter(got))])


def test_compact_seeds_follow_the_block_position_not_the_models_compiled_before():
    """CompAct draws each block's projection from its position in its list: a Bart compiled block by
    block gets the whole-model compile's seeds (its encoder's and decoder's blocks counted apart), and
    so does a second Bart compiled after it in the same process, with no ``activation_state.reset()``."""
    import transformers

    config = transformers.BartConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=3,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64)
    opts = {"activation": "compact", "compiler": "aot_eager", "targets": "*", "compact": {"rank": 8}}
    ids = models.batch(t=12)

    def seeds(regional):
        torch.manual_seed(0)
        model = transformers.BartForConditionalGeneration(config)
        if regional:
            memcompile.compile_blocks(model, opts)
            forward = model
        else:
            forward = torch.compile(model, backend="memtrain", options=opts)
        forward(input_ids=ids, labels=ids).loss.backward()
        return {name: s["compact_seed"] for name, s in activation_state.state_dict(model).items()}

    whole = seeds(regional=False)
    torch.compiler.reset()
    activation_state.reset()
    first, second = seeds(regional=True), seeds(regional=True)
    assert second == first and len(first) >= 5 * 3
    if tuple(int(v) for v in transformers.__version__.split(".")[:2]) < (5, 23):
        pytest.skip("before transformers 5.23 Bart's layers break Dynamo's graph (a data-dependent branch), so "
                    "its whole-model compile counts their blocks in the order they run")
    assert len(whole) >= 5 * 3  # every encoder and decoder layer compressed (q, k, v shared; fc1; fc2; ...)
    # The whole graph has every decoder layer's cross-attention keys and values share one group, as they
    # read one input (the encoder's output); a block's graph gets that input as its own.
    assert set(first) - set(whole) == {f"model.decoder.layers.{i}.encoder_attn.k_proj.weight" for i in (1, 2)}
    assert {n: first[n] for n in whole} == whole
    decoder = {n: v for n, v in whole.items() if ".decoder.layers." in n}
    assert len({v for n, v in decoder.items() if n.endswith("self_attn.q_proj.weight")}) == 3


def test_recompute_budget_advances_the_state_once_per_step():
    opts = {"activation": "compact", "compiler": "aot_eager", "targets": ["*"], "recompute_budget": 0.05}
    model = models.tiny_lora_llama()
    compiled = torch.compile(model, backend="memtrain", options=opts)
    _train(model, compiled, 3)
    calls = {s["compact_calls"] for s in activation_state.state_dict(model).values()}
    assert calls == {3}
    assert memcompile.report().passes["block_boundaries"]["counters"]["blocks"] == 2


def test_non_finite_first_batch_does_not_freeze_velora_vector():
    """A NaN batch gives NaN gradients for that step only; the vector comes from the next finite batch."""
    opts = {"activation": "velora", "compiler": "aot_eager", "velora": {"num_groups": 8}}
    model = models.tiny_lora_llama(layers=1)
    compiled = torch.compile(model, backend="memtrain", options=opts)
    ids = models.batch()
    embeds = model.get_input_embeddings()(ids).detach()
    bad = embeds.clone()
    bad[0, 3] = float("nan")
    with pytest.warns(UserWarning, match="NaN or inf"):
        compiled(inputs_embeds=bad, labels=ids).loss.backward()
    assert velora.vectors(model) == {}
    model.zero_grad(set_to_none=True)
    loss = compiled(inputs_embeds=embeds, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    vectors = velora.vectors(model)
    assert len(vectors) == 3 and all(torch.isfinite(v).all() for v in vectors.values())


_RESUME = textwrap.dedent("""
    import sys, torch, memcompile
    from memcompile import activation_state
    from tests import models
    from tests.test_regional import _train
    ckpt = sys.argv[1]
    opts = {"activation": "compact", "compiler": "aot_eager", "compact": {"rank": 8, "refresh": 2}}
    model = models.tiny_lora_llama(seed=7)
    saved = torch.load(ckpt)
    model.load_state_dict(saved["model"])
    activation_state.load_state_dict(model, saved["activation_state"])
    memcompile.compile_blocks(model, opts)
    for loss, _ in _train(model, model, 3, seed0=3):
        print("loss", repr(loss.item()))
""")


def test_checkpoint_mid_run_resumes_with_the_same_losses_in_a_fresh_process(tmp_path):
    opts = {"activation": "compact", "compiler": "aot_eager", "compact": {"rank": 8, "refresh": 2}}
    model = models.tiny_lora_llama(seed=7)
    memcompile.compile_blocks(model, opts)
    _train(model, model, 3)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "activation_state": activation_state.state_dict(model)}, ckpt)
    expected = [repr(loss.item()) for loss, _ in _train(model, model, 3, seed0=3)]
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", _RESUME, str(ckpt)], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("loss ")]
    assert got == expected


def test_an_evaluation_does_not_replace_the_training_step_in_the_report():
    """Evaluating under no_grad compiles the block and the loss again, as inference graphs; the report
    still shows the training step."""
    model = models.tiny_lora_llama(layers=3)
    memcompile.compile_blocks(model, {"compiler": "aot_eager", "activation": "velora"})
    ids = models.batch()
    model(input_ids=ids, labels=ids).loss.backward()
    trained = memcompile.report()
    with torch.no_grad():
        model(input_ids=ids, labels=ids)
    assert any(r.inference for r in memcompile.reports())
    rep = memcompile.report()
    assert not rep.inference and rep.bytes_after == trained.bytes_after > 0
    assert [len(g.served) for g in rep.graphs if g.served] == [3]


def test_compile_blocks_needs_repeated_blocks():
    with pytest.raises(ValueError, match="no nn.ModuleList of repeated blocks"):
        memcompile.compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)), {"compiler": "aot_eager"})
    with pytest.raises(ValueError, match="unknown memtrain option"):
        memcompile.compile_blocks(models.tiny_llama(layers=2), {"activaton": "velora"})


@pytest.mark.slow
def test_regional_inductor_bf16_variable_lengths():
    """The path users run: Inductor, bf16 base with fp32 adapters, lengths that change; one block graph
    (static, then one dynamic recompile) serves every layer."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(models.tiny_llama(layers=3).to(torch.bfloat16),
                           LoraConfig(r=4, lora_alpha=8, target_modules=list(LLAMA_LINEARS)))
    memcompile.compile_blocks(model, {"activation": "velora", "velora": {"num_groups": 8}})
    graphs = tc.dynamo_graph_count()
    for t in (16, 24, 40):
        ids = models.batch(t=t, seed=t)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss)
    assert tc.dynamo_graph_count() - graphs <= 4  # block and loss: static first, then dynamic
    rep = memcompile.report()
    assert [len(g.served) for g in rep.graphs if g.served] == [3]
    assert rep.bytes_after < rep.bytes_before


def test_every_served_layer_carries_the_approximation_mark():
    """The block graph is compiled on the first layer's parameters; every layer it serves gets the
    marks Fira reads, so Fira refuses an approximated gradient in any layer."""
    from memcompile.marks import grad_approximation

    model = models.tiny_llama(layers=3)
    memcompile.compile_blocks(model, {"compiler": "aot_eager", "activation": "compact"})
    ids = models.batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=ids, labels=ids).loss.backward()
    # The head's graph holds only lm_head, excluded by default: no warning that targets match nothing.
    assert not [w for w in caught if "match none of the" in str(w.message)]
    marked = {n for n, p in model.named_parameters() if grad_approximation(p) == "compact"}
    # CompAct's default targets: q/k/v, gate/up, down of every layer (o_proj excluded as in the paper)
    assert marked == {f"model.layers.{i}.{m}.weight" for i in range(3)
                      for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_regional_budget_with_fused_loss_equals_the_unbudgeted_run(compiler):
    """Under a recompute budget the head's graph (projection and loss) gets none: its only inputs are the
    final hidden states, the head's weight and the labels. The blocks keep theirs."""
    opts = {"activation": "velora", "compiler": compiler, "targets": ["*"], "fused_cross_entropy": True}
    runs = []
    for budget in (None, 0.2):
        torch.compiler.reset()
        activation_state.reset()
        model = models.tiny_lora_llama()
        memcompile.compile_blocks(model, {**opts, "recompute_budget": budget})
        runs.append(_train(model, model, 2))
        (fused,) = memcompile.report().passes["cross_entropy"]["losses"]
        assert fused["linear"] is True  # the output projection joined the loss: the logits are not kept
    _assert_same(runs[0], runs[1])


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_a_loss_compiled_on_its_own_under_a_budget_equals_the_unbudgeted_run(compiler):
    """The fused loss on logits that are graph inputs, under a recompute budget. A must-save on the op
    made the partitioner save its tuple output, which AOTAutograd refuses, and the knapsack saved it
    anyway: Inductor failed on the tuple."""
    torch.manual_seed(0)
    logits = torch.randn(2, 16, 128, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 128, (2, 16))

    def loss_fn(x, y):
        return torch.nn.functional.cross_entropy(x.float().view(-1, 128), y.view(-1))

    runs = []
    for budget in (None, 0.2):
        torch.compiler.reset()
        memcompile.clear_reports()
        compiled = torch.compile(loss_fn, backend="memtrain", options={
            "compiler": compiler, "fused_cross_entropy": True, "recompute_budget": budget})
        loss = compiled(logits, labels)
        grad, = torch.autograd.grad(loss, logits)
        assert len(memcompile.report().passes["cross_entropy"]["losses"]) == 1
        runs.append((loss.detach(), grad))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    torch.testing.assert_close(runs[0][0], loss_fn(logits, labels).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_report_counts_what_the_compiled_graphs_keep(compiler):
    """Under compile_blocks a block's hidden states and the head's final hidden states are graph inputs
    that the graph alone keeps alive. The report counts them: its saved bytes equal what autograd packs
    while the step runs, less what the eager final norm packs, and less the batch, the weights and the
    rotary tables (inputs held anyway)."""
    from memcompile.bench import measure

    model = models.tiny_lora_llama(layers=3)
    memcompile.compile_blocks(model, {"compiler": compiler, "activation": "velora"})
    ids = models.batch()
    model(input_ids=ids, labels=ids).loss.backward()  # compiles, and the report's step runs

    held = [*model.parameters(), *model.buffers(), ids]
    tables = model.base_model.model.model.rotary_emb.register_forward_hook(
        lambda module, args, out: held.extend(out) and None)
    eager = [model.base_model.model.model.norm]
    inside: list[bool] = []
    hooks = [h for m in eager for h in (m.register_forward_pre_hook(lambda *a: inside.append(True)),
                                          m.register_forward_hook(lambda *a: inside.clear()))]
    packed: list[tuple[torch.Tensor, bool]] = []  # what autograd keeps, and whether eager code kept it
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append((t, bool(inside))) or t, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    for h in (*hooks, tables):
        h.remove()
    skip = {measure.storage_key(t) for t in held}
    by_storage = {measure.storage_key(t): (t.untyped_storage().nbytes(), eager) for t, eager in packed
                  if measure.storage_key(t) not in skip}
    compiled = sum(n for n, eager in by_storage.values() if not eager)
    eager_bytes = sum(n for n, eager in by_storage.values() if eager)
    loss.backward()
    rep = memcompile.report()
    assert [len(g.served) for g in rep.graphs if g.served] == [3]
    assert eager_bytes > 0 and rep.bytes_after == compiled


def test_compile_blocks_starts_no_kernel_build_workers_for_a_cpu_model(monkeypatch):
    """Inductor's worker pool builds Triton (GPU) kernels; a CPU model's C++ kernels do not use it."""
    warmed = []
    monkeypatch.setattr(tc, "warm_kernel_build_pool", lambda: warmed.append(True))
    memcompile.compile_blocks(models.tiny_lora_llama(layers=2), {"activation": "velora"})
    assert warmed == []


def test_the_head_is_compiled_apart_from_the_body_and_a_deep_copy_runs_its_own_body():
    """The decoder body runs outside the head's graph (one graph for the blocks, one for the head), and
    a deep copy of the model calls its own body, not the original's."""
    model = models.tiny_lora_llama(layers=2)
    memcompile.compile_blocks(model, {"compiler": "aot_eager", "activation": "velora"})
    memcompile.compile_blocks(model, {"compiler": "aot_eager", "activation": "velora"})  # twice: no change
    ids = models.batch()
    graphs = tc.dynamo_graph_count()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    logits = out.logits.detach()
    assert tc.dynamo_graph_count() - graphs == 2
    assert "the output head and its loss: LlamaForCausalLM's forward outside its decoder body" in str(memcompile.report())
    body = model.base_model.model.model
    assert inspect.signature(body.forward) == inspect.signature(type(body).forward.__get__(body))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.base_model.model.model.norm.weight.mul_(2)
    assert not torch.equal(twin(input_ids=ids, labels=ids).logits, logits)
    torch.testing.assert_close(model(input_ids=ids, labels=ids).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize("loss", [True, False], ids=["head", "blocks_only"])
def test_a_compile_around_compiled_blocks_warns_that_its_options_do_not_reach_them(loss):
    """``torch.compile`` of a model whose blocks ``compile_blocks`` compiled (a trainer's, or a second
    try with other options) traces around them: their graphs, and their options, stay the first ones.
    That is said, not silent."""
    model = models.tiny_lora_llama(layers=2)
    memcompile.compile_blocks(model, {"compiler": "aot_eager", "activation": "compact"}, loss=loss)
    ids = models.batch()
    first = model(input_ids=ids, labels=ids).loss.detach()
    outer = torch.compile(model, backend="memtrain", options={"compiler": "aot_eager", "activation": "velora"})
    with pytest.warns(UserWarning, match="was compiled by memcompile.compile_blocks, with its options; an "
                                         "enclosing torch.compile"):
        again = outer(input_ids=ids, labels=ids).loss
    again.backward()
    blocks = [r for r in memcompile.reports() if r.served]
    assert blocks and all(r.activation == "compact" for r in blocks)
    if loss:  # the head is compiled_blocks' too: nothing of the enclosing compile's runs
        assert all(r.activation == "compact" for r in memcompile.reports())
        torch.testing.assert_close(again.detach(), first, rtol=0, atol=0)
        # fullgraph=True cannot trace around the head's region, its first call: Dynamo's error says why
        # (without the head, the first break is the model's own embedding hook on torch 2.11's Dynamo)
        strict = torch.compile(model, backend="memtrain", fullgraph=True, options={"compiler": "aot_eager"})
        with pytest.raises(Exception, match="a region memcompile.compile_blocks compiled"):
            strict(input_ids=ids, labels=ids)


def test_without_the_loss_only_the_blocks_compile_and_the_head_stays_eager():
    """``loss=False``: one graph for every layer, the head and its loss run eager (the model's own
    forward, untouched), and loss and gradients are the whole-model compile's."""
    opts = {"compiler": "aot_eager", "activation": "velora"}
    model = models.tiny_lora_llama(layers=2)
    whole = _train(model, torch.compile(model, backend="memtrain", options=opts), 2)
    torch.compiler.reset()
    activation_state.reset()
    memcompile.clear_reports()
    model = models.tiny_lora_llama(layers=2)
    body = model.base_model.model.model
    memcompile.compile_blocks(model, opts, loss=False)
    # With the loss, the body's forward is wrapped to run eager and its owner's is compiled: neither here.
    assert "forward" not in vars(body) and "forward" not in vars(model.base_model.model)
    graphs = tc.dynamo_graph_count()
    regional = _train(model, model, 2)
    assert tc.dynamo_graph_count() - graphs == 1
    report = str(memcompile.report())
    assert "one compiled block for 2 modules" in report and "the output head" not in report
    _assert_same(whole, regional)


def test_the_head_is_apart_when_the_model_calls_its_decoder_past_a_wrapper():
    """Bart's causal LM holds its decoder in a wrapper module and calls the decoder itself: the module
    left out of the head's graph is the one that runs the blocks, so the blocks keep their shared graph
    (2 graphs, not one graph of the whole model) and the loss is eager's."""
    from tests import architectures

    model = architectures.build("bart")
    ids = architectures.batch()
    expected = model(input_ids=ids, labels=ids).loss.detach()
    memcompile.compile_blocks(model, {"compiler": "aot_eager", "activation": "velora"})
    graphs = tc.dynamo_graph_count()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert tc.dynamo_graph_count() - graphs == 2
    assert [len(g.served) for g in memcompile.report().graphs if g.served] == [2]
    torch.testing.assert_close(loss.detach(), expected, rtol=0, atol=0)


def test_an_encoder_decoder_counts_both_block_lists_and_they_share_the_target():
    """A sequence-to-sequence model has two lists of blocks (Bart: 2 encoder layers, 3 decoder layers),
    compiled in the one forward frame they share: the step's report counts both block graphs, and under
    memory_target every layer's run of either graph and the head's graph plan for target / 6, so the
    step keeps at most the target, with the unplanned run's loss and gradients."""
    import transformers

    config = transformers.BartConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=3,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64)
    ids = models.batch(t=12)

    def run(opts):
        torch.compiler.reset()
        memcompile.clear_reports()
        torch.manual_seed(0)
        model = transformers.BartForConditionalGeneration(config)
        memcompile.compile_blocks(model, {"compiler": "aot_eager", "activation": "velora", "targets": "*", **opts})
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, memcompile.report()

    *free, rep = run({})
    assert sorted(len(g.served) for g in rep.graphs if g.served) == [2, 3]
    # The owner's forward before its bodies (the shifted labels) has a graph too: not labelled the head.
    assert sorted(g.region.split(":")[0] for g in rep.graphs if not g.served) == [
        "BartForConditionalGeneration's forward outside its decoder bodies, not the output head (compile_blocks)",
        "the output head and its loss"]
    # The encoder's output, which each of the 3 decoder blocks saves, counts once in the step.
    assert rep.repeated_input_bytes() == 2 * ids.numel() * config.d_model * 4
    assert rep.bytes_after == sum(g.bytes_after * rep.runs(g) for g in rep.graphs) - rep.repeated_input_bytes()
    target = int(rep.bytes_after * 0.8)
    *planned, rep_planned = run({"memory_target": target, "plan": {"offload": True}})
    plans = [g.passes["memory_plan"].counters for g in rep_planned.graphs if "memory_plan" in g.passes]
    assert len(plans) == 3 and all(c["target"] == target // 6 for c in plans)
    assert rep_planned.bytes_after <= target and sum(c["recompute"] + c["offload"] for c in plans) > 0
    _assert_same([tuple(planned)], [tuple(free)], rtol=0, atol=0)


def test_the_encoder_output_every_decoder_block_saves_counts_once():
    """Each decoder block of a sequence-to-sequence model reads the encoder's output, an input of the
    block's graph: without compression every block's graph saves it, and autograd keeps it once, so the
    step's report counts it once (and before the passes, once). The report's saving is then what
    autograd's saved-tensor hooks measure between an uncompressed and a compressed step, to the byte."""
    import transformers

    from memcompile.bench.measure import saved_bytes

    config = transformers.BartConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=4,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64)
    ids = models.batch(t=12)

    def run(activation, compiler="aot_eager"):
        torch.compiler.reset()
        memcompile.clear_reports()
        torch.manual_seed(0)
        model = transformers.BartForConditionalGeneration(config)
        memcompile.compile_blocks(model, {"compiler": compiler, "activation": activation, "targets": "*"})
        model(input_ids=ids, labels=ids).loss.backward()
        kept = saved_bytes(lambda: model(input_ids=ids, labels=ids).loss, [*model.parameters(), *model.buffers(), ids],
                           then=lambda loss: loss.backward())
        return kept, memcompile.report()

    kept_none, none = run("none")
    kept_compact, compact = run("compact")
    encoder_output = ids.numel() * config.d_model * 4
    assert none.repeated_input_bytes() == (config.decoder_layers - 1) * encoder_output
    assert compact.repeated_input_bytes("before") == (config.decoder_layers - 1) * encoder_output
    assert none.bytes_before == none.bytes_after
    assert compact.bytes_before - compact.bytes_after == kept_none - kept_compact > 0
    assert "count once" in str(none)
    # Under Inductor too; the label shift's graph, in which nothing requires grad, saves nothing (it had
    # left the step's bytes before the passes unknown).
    kept_inductor, inductor = run("none", "inductor")
    assert inductor.repeated_input_bytes() == (config.decoder_layers - 1) * encoder_output
    assert inductor.bytes_before == inductor.bytes_after
    # what the report leaves out, the eager layer norms, is the same as under aot_eager
    assert kept_inductor - inductor.bytes_after == kept_none - none.bytes_after
    assert sum(g.inference for g in inductor.graphs) == 1


def test_a_block_whose_layers_differ_counts_each_of_its_graphs_by_its_runs():
    """T5's first layer of each stack computes the position bias the others are passed, so Dynamo compiles
    the block more than once: the step's report counts every graph that ran, each as often as it ran
    (together once per layer), not the latest graph once per layer; the loss is eager's."""
    import transformers

    config = transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
                                   num_heads=4, decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    ids = models.batch(t=12)
    expected = model(input_ids=ids, labels=ids).loss.detach()
    blocks = memcompile.compile_blocks(model, {"compiler": "aot_eager", "activation": "velora"})
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    rep = memcompile.report()
    for layers in blocks.values():
        graphs = [g for g in rep.graphs if g.served == tuple(layers)]
        # the first layer's graph and the others' (their cache off: it would recompile for every layer)
        assert len(graphs) == 2 and sum(rep.runs(g) for g in graphs) == len(layers), [rep.runs(g) for g in graphs]
    assert not rep.short_blocks and not model.decoder.config.use_cache
    # the encoder's output, which the 3 decoder layers' graphs save, counts once
    assert rep.repeated_input_bytes() == 2 * ids.numel() * config.d_model * 4
    assert rep.bytes_after == sum(g.bytes_after * rep.runs(g) for g in rep.graphs) - rep.repeated_input_bytes()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_two_lists_of_blocks_train_compiled_past_one_functions_recompile_limit():
    """An encoder's and a decoder's blocks are Hugging Face layers whose forwards share one code object,
    and so would share Dynamo's per-function recompile limit (8): T5's first layer of each stack has a
    graph of its own, a changing length recompiles each, an evaluation compiles each again. Each list is
    a compiled region of its own, with its own limit, so every layer still runs a compiled block (none is
    left eager), and the limit stays Dynamo's."""
    import transformers

    config = transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
                                   num_heads=4, decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch._dynamo.config.patch(recompile_limit=8):  # the default
        memcompile.compile_blocks(model, {"compiler": "aot_eager", "activation": "velora"})
        for step, t in enumerate((12, 16)):
            ids = models.batch(t=t, seed=step)
            model(input_ids=ids, labels=ids).loss.backward()
        with torch.no_grad():
            model(input_ids=ids, labels=ids)
        ids = models.batch(t=20, seed=3)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        limit = torch._dynamo.config.recompile_limit
    rep = memcompile.report()
    assert sum(len(g.served) > 0 for g in memcompile.reports()) > 8 and not rep.short_blocks
    lists = {g.served for g in rep.graphs if g.served}
    assert sorted(sum(rep.runs(g) for g in rep.graphs if g.served == s) for s in lists) == [2, 3]
    assert limit == 8


@pytest.mark.slow
def test_an_encoder_decoder_under_inductor_with_changing_lengths_and_a_target():
    """The users' compiler on a sequence-to-sequence model: T5 (two lists of blocks, a first layer with a
    graph of its own) under Inductor, a length that changes (the second step's graphs are symbolic),
    and a memory target met with recomputes and host copies: each step's loss and gradients are eager's,
    within fp32 round-off."""
    import transformers

    config = transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
                                   num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)

    def run(opts):
        torch.compiler.reset()
        memcompile.clear_reports()
        torch.manual_seed(0)
        model = transformers.T5ForConditionalGeneration(config)
        if opts is not None:
            memcompile.compile_blocks(model, {"compiler": "inductor", "activation": "none", **opts})
        steps = []
        for t in (12, 16):
            ids = models.batch(t=t)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            steps.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
            model.zero_grad(set_to_none=True)
        return steps, memcompile.report()

    eager, _ = run(None)
    target = 200_000  # the unplanned step keeps 374 kB at 20 tokens, in proportion to the length
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # planned at the traced length: longer steps would keep more
        planned, rep = run({"memory_target": target, "plan": {"offload": True}})
    counters = rep.passes["memory_plan"]["counters"]
    assert counters["recompute"] > 0 and counters["offload"] > 0 and rep.bytes_after <= target
    _assert_same(planned, eager, rtol=1e-4, atol=1e-6)


def test_generation_runs_eager_and_leaves_the_recompile_limit_to_training():
    """``generate`` after training passes every layer a KV cache, whose per-layer index would recompile
    the block once per layer: past Dynamo's limit (8) with 10 layers, after which a training step that
    needs a new graph ran eager, uncompressed. Calls with a cache run the model's own forward: the tokens
    are eager's, nothing compiles, and the next new length compiles its block and head. Training with a
    cache warns, at the caller's line."""
    opts = {"compiler": "aot_eager", "activation": "velora"}
    model = models.tiny_lora_llama(layers=10)
    twin = models.tiny_lora_llama(layers=10)
    memcompile.compile_blocks(model, opts)
    ids = models.batch()
    model(input_ids=ids, labels=ids).loss.backward()
    twin.load_state_dict(model.state_dict())
    model.eval(), twin.eval()
    graphs = tc.dynamo_graph_count()
    for prompt, new in ((8, 6), (5, 3)):
        out = model.generate(ids[:, :prompt], max_new_tokens=new, do_sample=False)
        assert torch.equal(out, twin.generate(ids[:, :prompt], max_new_tokens=new, do_sample=False))
    assert tc.dynamo_graph_count() == graphs
    model.train()
    model(input_ids=ids[:, :12], labels=ids[:, :12]).loss.backward()
    assert tc.dynamo_graph_count() - graphs == 2  # the block's graph and the head's, for the new length
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own: once per message and line
        model(input_ids=ids, labels=ids, use_cache=True).loss.backward()
    # once for the 10 layers, at this file's line
    assert [w.filename for w in caught if "KV cache with gradients on" in str(w.message)] == [__file__]


@pytest.mark.parametrize("isolates", [True, False], ids=["isolate_recompiles", "own_code"])
def test_the_heads_decorators_run_outside_dynamo(isolates, monkeypatch):
    """The head's region compiles the function its decorators wrap (transformers 5.24 wraps a model's
    ``forward`` twice) and runs the wrappers as they are: a graph break inside would make Dynamo trace
    each wrapper's frame to it and restart. The result is the same."""
    monkeypatch.setattr(tc, "ISOLATES", isolates and tc.ISOLATES)
    if isolates and not tc.ISOLATES:
        pytest.skip("this torch has no isolate_recompiles")
    compiling = []

    def recording(f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            compiling.append(torch.compiler.is_compiling())
            return f(*args, **kwargs)
        return wrapper

    @recording
    @recording
    def fn(x):
        return torch.sin(x) + 1

    x = torch.randn(4)
    torch.compiler.reset()
    assert torch.equal(tc.compile_region(fn, "eager", None, eager_decorators=True)(x), torch.sin(x) + 1)
    assert compiling == [False, False]
    torch.compiler.reset()
    tc.compile_region(fn, "eager", None)(x)  # without: Dynamo traces the wrappers
    assert compiling[2:] == [True, True]


@pytest.mark.parametrize("isolates", [True, False], ids=["isolate_recompiles", "own_code"])
def test_models_built_one_after_another_each_compile_their_own_graphs(isolates, monkeypatch):
    """A notebook's rerun, a sweep: every model compile_blocks compiles in one process gets its own
    graphs and its own recompile limit. The layers' forward code is shared by every model of the class,
    and Dynamo counts recompiles per code object: from the third model on, no graph was compiled and
    the model trained eager, uncompressed. Also as on a torch without ``isolate_recompiles`` (< 2.13)."""
    if isolates and not tc.ISOLATES:
        pytest.skip("this torch has no isolate_recompiles")
    monkeypatch.setattr(tc, "ISOLATES", isolates)
    ids = models.batch()
    added = []
    for _ in range(4):
        model = models.tiny_lora_llama(layers=2)
        memcompile.compile_blocks(model, {"compiler": "aot_eager", "activation": "velora"})
        graphs = tc.dynamo_graph_count()
        for t in (16, 12, 10):
            model(input_ids=ids[:, :t], labels=ids[:, :t]).loss.backward()
        with torch.no_grad():
            model(input_ids=ids, labels=ids)
        added.append(tc.dynamo_graph_count() - graphs)
        assert "one compiled block for 2 modules" in str(memcompile.report())
    # each its block's and head's graphs, for two lengths and an evaluation (the first model also compiles
    # a graph the later ones find compiled)
    assert added[1:] == [added[1]] * 3 and 4 <= added[1] <= added[0], added
