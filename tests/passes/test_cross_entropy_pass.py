"""The fused cross-entropy pass: on a Dynamo graph on its own, and through the backend on a bf16 Llama."""
import pytest
import torch
import torch.nn.functional as F

import memcompile
from memcompile.passes.cross_entropy import fuse_cross_entropy
from tests import models

V = 50


def _loss(logits, labels, **kw):
    return F.cross_entropy(logits.float().view(-1, V), labels.view(-1), **kw)


def _run(fn, logits, labels):
    """Compile ``fn`` with a backend that applies the pass to Dynamo's graph; returns the result, the
    pass's record and the targets left in the graph."""
    seen = {}

    def backend(gm, example_inputs):
        seen["record"] = fuse_cross_entropy(gm)
        seen["targets"] = [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
        return gm.forward

    x = logits.clone().requires_grad_()
    loss = torch.compile(fn, backend=backend, fullgraph=True)(x, labels)
    loss.backward()
    return loss, x.grad, seen


def _data(dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 8, V, generator=gen).to(dtype)
    labels = torch.randint(0, V, (2, 8), generator=gen)
    labels[0, :3] = -100
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rewrites_the_loss_and_drops_the_upcast(dtype):
    logits, labels = _data(dtype)
    loss, grad, seen = _run(_loss, logits, labels)
    assert seen["record"]["counters"] == {"rewritten": 1, "skipped": 0}
    assert F.cross_entropy not in seen["targets"]
    assert memcompile.kernels.cross_entropy.cross_entropy in seen["targets"]
    # A 16-bit input loses its .float(); an fp32 one had nothing to drop (float() of fp32 is itself).
    assert ("float" in seen["targets"]) == (dtype == torch.float32)
    assert seen["record"]["losses"][0]["upcast_dropped"] == (dtype != torch.float32)
    x = logits.clone().requires_grad_()
    expected = _loss(x, labels)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, x.grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)


class Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, V, bias=False).to(torch.bfloat16)

    def forward(self, h, labels):
        logits = self.proj(h)
        return _loss(logits, labels), logits


@pytest.mark.parametrize("logits_trained", [False, True])
def test_output_projection_joins_the_loss_and_the_logits_stay_an_output(logits_trained):
    torch.manual_seed(0)
    head, (_, labels) = Head(), _data()
    h = torch.randn(2, 8, 16).to(torch.bfloat16)
    seen = {}

    def backend(gm, example_inputs):
        seen["record"] = fuse_cross_entropy(gm)
        seen["targets"] = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        return gm.forward

    def run(fn):
        head.zero_grad()
        x = h.clone().requires_grad_()
        loss, logits = fn(x, labels)
        total = loss + logits.float().square().mean() if logits_trained else loss
        total.backward()
        return loss, logits, x.grad, head.proj.weight.grad

    got = run(torch.compile(head, backend=backend, fullgraph=True))
    want = run(head)
    assert seen["record"]["losses"][0]["linear"] is True
    assert memcompile.kernels.linear_cross_entropy.linear_cross_entropy in seen["targets"]
    assert torch.nn.functional.linear not in seen["targets"]
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1])  # the same bf16 logits, returned
    for a, b in zip(got[2:], want[2:]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


def test_unsupported_calls_are_left_alone_and_reported():
    logits, labels = _data()
    loss, grad, seen = _run(lambda a, b: _loss(a, b, label_smoothing=0.1), logits, labels)
    assert seen["record"]["counters"] == {"rewritten": 0, "skipped": 1}
    assert seen["record"]["skipped"][0]["reason"] == "not fused: label smoothing"
    assert F.cross_entropy in seen["targets"]


def test_backend_bf16_llama_saves_no_fp32_logits():
    model, ids = models.tiny_lora_llama(vocab=96), models.batch(vocab=96)  # a width no other tensor has
    model = model.to(torch.bfloat16)
    vocab = model.config.vocab_size
    results = {}
    for fused in (False, True):
        torch.compiler.reset()
        model.zero_grad(set_to_none=True)
        opts = {"compiler": "aot_eager", "activation": "none", "fused_cross_entropy": fused}
        loss = torch.compile(model, backend="memtrain", options=opts)(input_ids=ids, labels=ids).loss
        loss.backward()
        rep = memcompile.report()
        fp32_logits = [t for t in rep.saved_after if t.shape and t.shape[-1] == vocab and t.dtype == "float32"]
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[fused] = (loss.detach(), grads, fp32_logits, rep)
    (loss_a, grads_a, fp32_a, _), (loss_b, grads_b, fp32_b, rep) = results[False], results[True]
    assert fp32_a and not fp32_b  # torch's loss keeps log_softmax's fp32 output; the fused one does not
    assert rep.passes["cross_entropy"]["counters"]["rewritten"] == 1
    # lm_head joined the loss: no (tokens, vocab) tensor of any dtype is kept for the backward
    assert rep.passes["cross_entropy"]["losses"][0]["linear"] is True
    assert not [t for t in rep.saved_after if t.shape and t.shape[-1] == vocab]
    assert "fused loss" in str(rep)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    for name in grads_a:  # bf16 gradients: one rounding of a differently summed fp32 value
        torch.testing.assert_close(grads_b[name].float(), grads_a[name].float(), rtol=2e-2, atol=1e-3, msg=name)


def test_budget_never_reruns_the_fused_loss_in_the_backward(tmp_path):
    model, ids = models.tiny_lora_llama(vocab=96), models.batch(vocab=96)
    model = model.to(torch.bfloat16)
    opts = {"compiler": "aot_eager", "activation": "velora", "fused_cross_entropy": True, "recompute_budget": 0.05,
            "dump_dir": str(tmp_path)}
    torch.compile(model, backend="memtrain", options=opts)(input_ids=ids, labels=ids).loss.backward()
    rep = memcompile.report()
    assert rep.passes["cross_entropy"]["counters"]["statistics_kept"] == 1
    backward = (tmp_path / f"graph{rep.graph_id}_backward.txt").read_text()
    assert "linear_cross_entropy_forward.default" not in backward  # only its backward's aten ops run there
    forward = (tmp_path / f"graph{rep.graph_id}_forward.txt").read_text()
    assert "linear_cross_entropy_forward.default" in forward


def test_budget_under_inductor_keeps_a_copy_of_the_plain_losss_statistics(tmp_path):
    """A plain fused loss (the logits pass through ops before it, so the projection cannot join) under a
    budget and Inductor, whose joint graph has no detach: the forward saves a copy of the log-sum-exp
    (never the op's tuple) and the backward does not rerun the loss."""
    torch.manual_seed(0)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 128)

        def forward(self, x, y):
            logits = (self.b(self.a(x).relu().sin().cos()) * 0.5).tanh()
            return F.cross_entropy(logits.float().view(-1, 128), y.view(-1))

    model = Head().to(torch.bfloat16)
    x, y = torch.randn(32, 64, dtype=torch.bfloat16), torch.randint(0, 128, (32,))
    opts = {"compiler": "inductor", "activation": "none", "fused_cross_entropy": True, "recompute_budget": 0.05,
            "dump_dir": str(tmp_path)}
    torch.compile(model, backend="memtrain", options=opts)(x, y).backward()
    rep = memcompile.report()
    assert rep.passes["cross_entropy"]["counters"]["statistics_kept"] == 1
    forward = (tmp_path / f"graph{rep.graph_id}_forward.txt").read_text()
    saved = forward[forward.rindex("return"):]
    assert "clone" in saved and "cross_entropy_forward," not in saved and "cross_entropy_forward)" not in saved
    backward = (tmp_path / f"graph{rep.graph_id}_backward.txt").read_text()
    assert "cross_entropy_forward.default" not in backward


def test_gpt2_tied_trainable_output_projection_gets_its_gradient():
    """Full training of GPT-2, whose output projection is the (trained) token embedding: the fused op's
    weight gradient adds to the embedding's own, as torch's would."""
    model, ids = models.tiny_gpt2(), models.batch()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    opts = {"compiler": "aot_eager", "activation": "none", "fused_cross_entropy": True}
    loss = torch.compile(model, backend="memtrain", options=opts)(input_ids=ids, labels=ids).loss
    loss.backward()
    assert memcompile.report().passes["cross_entropy"]["losses"][0]["linear"] is True
    assert model.lm_head.weight is model.transformer.wte.weight
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_style_sum_reduction_over_num_items_in_batch():
    """Hugging Face's Trainer passes num_items_in_batch: the loss is then a sum divided by it."""
    model, ids = models.tiny_lora_llama(vocab=96), models.batch(vocab=96)
    model = model.to(torch.bfloat16)
    n = torch.tensor(25)
    want = model(input_ids=ids, labels=ids, num_items_in_batch=n).loss
    opts = {"compiler": "aot_eager", "activation": "none", "fused_cross_entropy": True}
    got = torch.compile(model, backend="memtrain", options=opts)(input_ids=ids, labels=ids, num_items_in_batch=n).loss
    assert memcompile.report().passes["cross_entropy"]["counters"] == {"rewritten": 1, "skipped": 0}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
