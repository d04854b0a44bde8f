"""Defects users met outside the well-trodden path: gradient checkpointing, autocast, bf16 under
Inductor, layer classes other than nn.Linear, options that silently did nothing, wrapped errors."""
import warnings

import pytest
import torch

import memcompile
from memcompile.config import LLAMA_LINEARS
from tests import models


def test_bad_option_is_raised_as_our_own_value_error():
    """Dynamo wraps what a backend raises in BackendCompilerFailed; a bad option reads as memtrain's."""
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="memtrain", options={"activation": "velroa"})
    with pytest.raises(ValueError) as info:
        compiled(torch.randn(2, 4))
    assert str(info.value).startswith("memtrain option 'activation': got 'velroa'; valid:")
    assert "BackendCompilerFailed" not in type(info.value).__name__


def test_prepare_adapts_gpt2_conv1d_and_falcon_linear():
    """GPT-2's Conv1D and Falcon's Linear subclass match lora.targets by name: they are adapted, and the
    prepared model at B = 0 computes what the quant="none" base computed."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    falcon = FalconForCausalLM(FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                            vocab_size=128, new_decoder_architecture=False))
    for model, targets in ((models.tiny_gpt2(layers=1, hidden=32), ["c_attn", "c_fc", "mlp.c_proj"]),
                           (falcon, ["query_key_value", "dense_h_to_4h", "dense_4h_to_h"])):
        ids = models.batch()
        with torch.no_grad():
            want = model(input_ids=ids).logits
        memcompile.prepare(model, {"lora": {"targets": targets, "r_max": 4, "quant": "none"}})
        adapted = [n for n, m in model.named_modules() if isinstance(m, memcompile.LoRALinear)]
        assert len(adapted) == 3, adapted
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_prepare_names_the_class_it_does_not_adapt():
    model = torch.nn.ModuleDict({"q_proj": torch.nn.Conv1d(4, 4, 1)})
    with pytest.raises(ValueError, match=r"torch\.nn\.modules\.conv\.Conv1d \(q_proj\); it adapts nn\.Linear"):
        memcompile.prepare(model, {"lora": {"targets": ["q_proj"]}})


def test_prepare_twice_with_another_rank_is_an_error():
    model = models.tiny_llama(layers=1, hidden=32, inter=64)
    memcompile.prepare(model, {"lora": {"r_max": 8, "quant": "none"}})
    memcompile.prepare(model, {"lora": {"r_max": 8, "quant": "none"}})  # the same settings: nothing to do
    with pytest.raises(ValueError, match=r"already prepared .* lora\.r_max=16 \(prepared with 8\)"):
        memcompile.prepare(model, {"lora": {"r_max": 16, "quant": "none"}})


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))


def test_targets_that_match_nothing_warn_with_the_layer_names():
    model = _mlp()
    compiled = torch.compile(model, backend="memtrain",
                             options={"activation": "velora", "compiler": "aot_eager", "targets": ["down_proj"],
                                      "velora": {"num_groups": 4}})
    with pytest.warns(UserWarning, match=r"targets=\['down_proj'\] .* match none of the 2 trainable linear "
                                         r"layers .* names look like \['0', '2'\]: set `targets`"):
        compiled(torch.randn(8, 16)).sum().backward()
    assert memcompile.report().passes["activation_compression"]["rewritten"] == []


@pytest.mark.parametrize("rank", [1.0, 64])
def test_compact_rank_not_below_the_width_leaves_the_layer_exact_and_warns(rank):
    model = _mlp()
    x = torch.randn(8, 16)
    compiled = torch.compile(model, backend="memtrain", options={
        "activation": "compact", "compiler": "aot_eager", "targets": "*", "compact": {"rank": rank}})
    with pytest.warns(UserWarning, match=rf"compact.rank={rank} does not narrow the input of 0, 2: .* left exact"):
        compiled(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for g, p in zip(grads, model.parameters()):
        assert torch.equal(g, p.grad)
    skipped = memcompile.report().passes["activation_compression"]["skipped"]
    assert [s["layer"] for s in skipped if s["reason"].startswith("compact.rank")] == ["0", "2"]


def test_fused_loss_under_autocast_keeps_the_logits_dtype_and_values():
    """Under autocast the output projection runs in bf16; the fused projection+loss must too."""
    model, ids = models.tiny_llama(layers=1), models.batch()

    def step(forward):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), out.loss.detach(), model.lm_head.weight.grad.clone()

    logits_e, loss_e, grad_e = step(model)
    compiled = torch.compile(model, backend="memtrain", options={
        "activation": "none", "compiler": "aot_eager", "fused_cross_entropy": True})
    logits_c, loss_c, grad_c = step(compiled)
    assert logits_c.dtype == logits_e.dtype == torch.bfloat16
    assert torch.equal(logits_c, logits_e)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)  # fp32 sums in another order
    torch.testing.assert_close(grad_c, grad_e)
    (loss,) = memcompile.report().passes["cross_entropy"]["losses"]
    assert loss["linear"] and loss["dtype"] == "bfloat16"


def test_gradient_checkpointing_leaves_checkpointed_layers_exact_and_says_why():
    """Checkpointed layers' inputs are recomputed, never saved: compressing them saved nothing (measured
    0 B) but still approximated their gradients. They stay exact, the report says why, one warning."""
    model, ids = models.tiny_lora_llama(layers=1), models.batch()
    model.gradient_checkpointing_enable()
    model.train()
    compiled = torch.compile(model, backend="memtrain", options={
        "activation": "velora", "compiler": "aot_eager", "velora": {"num_groups": 8}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(input_ids=ids, labels=ids).loss.backward()
    checkpoint_warnings = [w for w in caught if "activation-checkpointed" in str(w.message)]
    assert len(checkpoint_warnings) == 1
    assert checkpoint_warnings[0].filename == __file__  # the line that ran the model, not the pass's
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    rep = next(r for r in memcompile.reports() if r.passes.get("activation_compression", {}).get("skipped"))
    skipped = rep.passes["activation_compression"]["skipped"]
    assert sum("activation-checkpointed" in s["reason"] for s in skipped) == 7  # every LoRA A of the layer
    assert rep.predicted_saving == rep.bytes_before - rep.bytes_after == 0
    assert "activation-checkpointed" in str(rep)


@pytest.mark.slow
def test_inductor_bf16_report_predicts_what_it_measures():
    """A bf16 base with fp32 adapters: PEFT casts the input once per adapter. Inductor spells the cast
    prims.convert_element_type; the pass must see through it as through aten._to_copy, or q/k/v's
    copies become three groups, each predicted to free a copy the partitioner never kept."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(models.tiny_llama(layers=1).to(torch.bfloat16),
                           LoraConfig(r=4, lora_alpha=8, target_modules=list(LLAMA_LINEARS)))
    ids = models.batch()
    compiled = torch.compile(model, backend="memtrain", options={"activation": "velora", "velora": {"num_groups": 8}})
    compiled(input_ids=ids, labels=ids).loss.backward()
    rep = memcompile.report()
    groups = rep.passes["activation_compression"]["rewritten"]
    assert sorted(len(g["layers"]) for g in groups) == [1, 1, 2, 3]  # qkv, o, gate/up, down: as under aot_eager
    assert rep.bytes_before - rep.bytes_after == rep.predicted_saving > 0


def test_prepare_takes_peft_lora_on_gpt2_conv1d():
    """PEFT's LoRA on Conv1D (fan_in_fan_out) computes base(x) + B A x like any other: its adapter is
    taken over and the prepared model computes what the PEFT model computed."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(models.tiny_gpt2(layers=1, hidden=32),
                           LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    ids = models.batch()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    prepared = memcompile.prepare(model, {"lora": {"targets": ["c_attn", "c_fc"], "r_max": 4, "quant": "none"}})
    with torch.no_grad():
        torch.testing.assert_close(prepared(input_ids=ids).logits, want)


_FREED = """
import gc, sys, weakref
import torch
import memcompile
from tests import models

how, compiler = sys.argv[1:]
model = models.tiny_lora_llama(layers=2)
weight = weakref.ref(model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight)
opts = {"compiler": compiler, "activation": "velora", "fused_cross_entropy": True}
if how == "blocks":
    memcompile.compile_blocks(model, opts)
    step = model
else:
    step = torch.compile(model, backend="memtrain", options=opts)
ids = models.batch()
for t in (16, 12):  # a static graph and a dynamic one
    step(input_ids=ids[:, :t], labels=ids[:, :t]).loss.backward()
assert memcompile.report().bytes_after > 0  # the report is read: its deferred partition has run
del model, step
gc.collect()
print("freed" if weight() is None else "kept")
"""


@pytest.mark.parametrize("how,compiler", [("whole", "aot_eager"), ("blocks", "aot_eager"), ("blocks", "inductor")])
def test_a_deleted_model_is_freed(how, compiler):
    """Dynamo keeps a compiled function on the forward's code, which outlives the model; the function held
    memtrain's compile context (its backward's compiler, the report's deferred partition), whose example
    inputs are the model's parameters: a model deleted after training stayed in memory, and on a GPU a
    second model loaded in its place (a notebook's rerun) ran out of memory. Plain torch.compile frees it.
    In a fresh process: pytest keeps a test's log records until it ends, and bitsandbytes, imported during
    a process's first compile, logs a warning with its exception, whose traceback holds that compile's
    frames."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", _FREED, how, compiler], capture_output=True, text=True, env=env,
                         cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "freed"
