"""``memcompile.prepare``: NF4 base + DyLoRA on a tiny Llama, against bitsandbytes, PEFT and DyLoRA's formulas."""
import io
import logging

import pytest
import torch
import torch.nn as nn

from memcompile.adapt import export_peft_adapter, merge_lora, prepare, quantized_layers
from memcompile.config import LLAMA_LINEARS
from memcompile.lora import LoRALinear, RankSampler, get_rank, set_rank
from memcompile.quant.nf4.module import NF4Linear
from memcompile.quant.nf4.nf4_quant import nf4_quantize
from tests import models

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402

TARGETS = LLAMA_LINEARS
R_MAX, ALPHA = 4, 8.0


def _cfg(**kw):
    return {"lora": {"r_max": R_MAX, "alpha": ALPHA, **kw}}


def _randomise_b(model, seed=0):
    """DyLoRA starts B at zero; a random B makes every adapter gradient non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in _layers(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def _layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _loss_and_grads(model, ids, call=None):
    """Loss and adapter gradients of ``model``, run through ``call`` (e.g. its compiled version)."""
    model.zero_grad(set_to_none=True)
    loss = (model if call is None else call)(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_prepare_swaps_targets_to_nf4():
    dense = models.tiny_llama()
    originals = {n: m.weight.detach().clone() for n, m in dense.named_modules()
                 if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS}
    model = prepare(dense, _cfg())
    layers = dict(_layers(model))
    assert set(layers) == set(originals) and len(layers) == 14
    for name, layer in layers.items():
        base = layer.base_layer
        assert isinstance(base, NF4Linear) and base.double_quant
        assert layer.lora_A.shape == (R_MAX, layer.in_features) and layer.lora_B.shape == (layer.out_features, R_MAX)
        # bitsandbytes quantises the original weight to exactly these codes and dequantises to exactly this
        packed, st = bnbf.quantize_4bit(originals[name], quant_type="nf4", blocksize=64, compress_statistics=True)
        assert torch.equal(base.weight, packed)
        assert torch.equal(base.dequantize(), bnbf.dequantize_4bit(packed, st))
        # no dense copy of the weight left in the layer
        assert not any(t.is_floating_point() and t.shape == originals[name].shape
                       for t in (*base.parameters(), *base.buffers()))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in layers for ab in "AB"}
    assert isinstance(model.lm_head, nn.Linear)  # not a target


def test_prepared_model_starts_at_the_quantised_base():
    ids = models.batch()
    model = prepare(models.tiny_llama(), _cfg())
    with torch.no_grad():
        out = model(input_ids=ids).logits
        for _, layer in _layers(model):  # B = 0: the adapter adds exactly nothing
            w = layer.base_layer.dequantize()
            layer.base_layer = nn.Linear(layer.in_features, layer.out_features, bias=False)
            layer.base_layer.weight.copy_(w)
        assert torch.equal(out, model(input_ids=ids).logits)


def test_quantized_layers_report():
    model = prepare(models.tiny_llama(), _cfg())
    rows = quantized_layers(model)
    assert len(rows) == 14
    q = next(r for r in rows if r["name"] == "model.layers.0.self_attn.q_proj")
    assert q["shape"] == (64, 64) and q["dtype"] == "float32" and q["format"] == "nf4+dq"
    assert q["bytes_before"] == 64 * 64 * 4
    # 4-bit codes + 1 byte absmax per 64 + one fp32 per 256 blocks + offset + code tables (16 + 256 fp32)
    assert q["bytes_after"] == 64 * 64 // 2 + 64 + 4 + 4 + 16 * 4 + 256 * 4
    assert quantized_layers(prepare(models.tiny_llama(), _cfg(quant="none"))) == []


@pytest.mark.parametrize("frozen", [False, True])
def test_adapter_grads_follow_dylora(frozen):
    """Gradients of A and B at rank b against DyLoRA's formulas, computed here in float64:
    y = W x + (alpha/b) B[:, :b] A[:b] x, so dA[:b] = (alpha/b) (g B_b)^T x and dB[:, :b] = (alpha/b) g^T (x A_b^T);
    frozen mode keeps only row b-1 of dA and column b-1 of dB. Rows/columns past b are zero."""
    torch.manual_seed(0)
    r_max, alpha = 6, 12.0
    base = nn.Linear(20, 9)
    layer = LoRALinear(NF4Linear.from_linear(base), r_max, alpha, frozen=frozen)
    with torch.no_grad():
        layer.lora_B.normal_()
    x, g = torch.randn(7, 20), torch.randn(7, 9)
    w = layer.base_layer.dequantize().double()
    a, bm = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    for b in (1, 3, 6):
        layer.set_rank(b)
        layer.zero_grad()
        y = layer(x)
        y.backward(g)
        s = alpha / b
        xd, gd = x.double(), g.double()
        y_ref = xd @ w.t() + base.bias.double() + s * (xd @ a[:b].t()) @ bm[:, :b].t()
        da, db = torch.zeros_like(a), torch.zeros_like(bm)
        da[:b] = s * (gd @ bm[:, :b]).t() @ xd
        db[:, :b] = s * gd.t() @ (xd @ a[:b].t())
        if frozen:
            da[: b - 1] = 0
            db[:, : b - 1] = 0
        assert torch.allclose(y.double(), y_ref, atol=1e-5)
        assert torch.allclose(layer.lora_A.grad.double(), da, atol=1e-5, rtol=1e-5)
        assert torch.allclose(layer.lora_B.grad.double(), db, atol=1e-5, rtol=1e-5)
        nonzero_rows = layer.lora_A.grad.abs().sum(1).nonzero().flatten().tolist()
        assert nonzero_rows == ([b - 1] if frozen else list(range(b)))


def test_rank_validation():
    model = prepare(models.tiny_llama(), _cfg())
    for bad in (0, R_MAX + 1, 2.0, True, -1):
        with pytest.raises(ValueError, match="rank"):
            set_rank(model, bad)
    set_rank(model, 2)
    assert get_rank(model) == 2
    sampler = RankSampler(model, seed=3)
    ranks = [sampler.step() for _ in range(50)]
    assert set(ranks) == set(range(1, R_MAX + 1)) and get_rank(model) == ranks[-1]
    callback = sampler.trainer_callback()  # transformers.Trainer calls this at each optimizer step
    drawn = []
    for _ in range(20):
        callback.on_step_begin(args=None, state=None, control=None)
        drawn.append(get_rank(model))
    assert len(set(drawn)) > 1
    fixed = prepare(models.tiny_llama(), _cfg(dynamic=False))
    assert {RankSampler(fixed).step() for _ in range(5)} == {R_MAX}


def test_set_rank_writes_every_layers_masks():
    """The masks DyLoRA's formula gives at rank b, in each layer's own buffers and dtype, for layers of
    different kinds in one model (set together, with multi-tensor copies)."""
    model = prepare(models.tiny_llama(), _cfg())
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    odd = layers[1]
    odd.alpha, odd.frozen = 3.0, True  # another kind of layer: its own masks
    layers[2].to(torch.bfloat16)  # a cast layer: its buffers in bf16
    for b in (1, 3, R_MAX):
        set_rank(model, b)
        for m in layers:
            idx = torch.arange(R_MAX)
            want = (idx == b - 1) * (m.alpha / b) if m.frozen else (idx < b) * (m.alpha / b)
            want_frozen = (idx < b - 1) * (m.alpha / b) if m.frozen else torch.zeros(R_MAX)
            assert torch.equal(m.lora_mask, want.to(m.lora_mask.dtype)) and m.rank == b
            assert torch.equal(m.lora_mask_frozen, want_frozen.to(m.lora_mask_frozen.dtype))
    assert layers[2].lora_mask.dtype == torch.bfloat16


def _counting(backend_name):
    calls = []

    def backend(gm, example_inputs, **kw):
        calls.append(gm)
        return torch._dynamo.lookup_backend(backend_name)(gm, example_inputs, **kw)

    return backend, calls


def test_compiled_training_matches_eager_without_recompiles():
    """aot_eager, fullgraph (0 graph breaks), one compile across rank changes, loss and grads = eager."""
    ids = models.batch()
    model = prepare(models.tiny_llama(), _cfg(frozen=False))
    _randomise_b(model)
    backend, calls = _counting("aot_eager")
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    sampler = RankSampler(model, seed=1)
    ranks = []
    for step in range(5):
        if step < 3:
            b = sampler.step()
        else:  # the extremes, set by hand as for evaluation
            b = [1, R_MAX][step - 3]
            set_rank(model, b)
        ranks.append(b)
        loss_e, grads_e = _loss_and_grads(model, ids)
        loss_c, grads_c = _loss_and_grads(model, ids, compiled)
        assert torch.allclose(loss_c, loss_e, rtol=1e-6, atol=1e-6)
        assert grads_c.keys() == grads_e.keys() and len(grads_e) == 28
        for n in grads_e:
            assert torch.allclose(grads_c[n], grads_e[n], rtol=1e-5, atol=1e-7), (b, n)
        rows = grads_e["model.layers.0.self_attn.q_proj.lora_A"].abs().sum(1)
        assert rows[:b].gt(0).all() and rows[b:].eq(0).all()
    assert len(set(ranks)) >= 3
    assert len(calls) == 1


def test_memtrain_backend_matches_eager():
    import memcompile

    if "memtrain" not in torch.compiler.list_backends(exclude_tags=()):
        pytest.skip("memtrain backend not registered")
    ids = models.batch()
    model = prepare(models.tiny_llama(), _cfg(frozen=True))
    _randomise_b(model)
    compiled = torch.compile(model, backend="memtrain", fullgraph=True,
                             options={"compiler": "aot_eager", "activation": "none"})
    for b in (3, 1, 4):
        set_rank(model, b)
        loss_e, grads_e = _loss_and_grads(model, ids)
        loss_c, grads_c = _loss_and_grads(model, ids, compiled)
        assert torch.allclose(loss_c, loss_e, rtol=1e-6, atol=1e-6)
        for n in grads_e:
            assert torch.allclose(grads_c[n], grads_e[n], rtol=1e-5, atol=1e-7), (b, n)
        rows = grads_e["model.layers.1.mlp.down_proj.lora_A"].abs().sum(1)
        assert rows.gt(0).tolist() == [i == b - 1 for i in range(R_MAX)]  # frozen mode: only row b
    assert len(memcompile.reports()) == 1  # one graph, compiled once for all ranks


def test_state_dict_round_trip():
    ids = models.batch()
    model = prepare(models.tiny_llama(seed=0), _cfg(frozen=True))
    _randomise_b(model)
    set_rank(model, 3)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    other = prepare(models.tiny_llama(seed=1), _cfg(frozen=True))
    buf.seek(0)
    result = other.load_state_dict(torch.load(buf))
    assert not result.missing_keys and not result.unexpected_keys
    assert get_rank(other) == 3
    ours, theirs = model.state_dict(), other.state_dict()
    assert ours.keys() == theirs.keys()
    assert {k for k in ours if k.endswith("weight_nested_absmax")}  # the double-quant state is in there
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, other(input_ids=ids).logits)


def test_dtype_casts_keep_quant_state():
    model = prepare(models.tiny_llama(), _cfg())
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.base_layer.dequantize(torch.float32)
    model.to(torch.bfloat16)
    assert layer.base_layer.weight_absmax.dtype == torch.uint8
    assert layer.base_layer.weight_nested_absmax.dtype == torch.float32
    assert torch.equal(layer.base_layer.dequantize(torch.float32), before)
    out = model(input_ids=models.batch()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_quant_none_keeps_dense_base():
    dense = models.tiny_llama()
    weight = dense.model.layers[0].mlp.up_proj.weight
    model = prepare(dense, _cfg(quant="none"))
    layer = model.model.layers[0].mlp.up_proj
    assert type(layer.base_layer) is nn.Linear and layer.base_layer.weight is weight
    assert not weight.requires_grad


def test_unsupported_layers(caplog):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Conv1d(4, 4, 1)
            self.v_proj = nn.Linear(4, 4)

    with caplog.at_level(logging.WARNING, logger="memcompile.prepare"):
        model = prepare(Odd(), _cfg())
    assert isinstance(model.q_proj, nn.Conv1d) and isinstance(model.v_proj, LoRALinear)
    assert "q_proj" in caplog.text and "skipped" in caplog.text
    with pytest.raises(ValueError, match="float64"):
        prepare(nn.Sequential(nn.Linear(4, 4).double()), _cfg(targets=["0"]))
    with pytest.raises(ValueError, match="no layer"):
        prepare(nn.Sequential(nn.Linear(4, 4)), _cfg())


def _save_tiny_llama(tmp_path):
    dense = models.tiny_llama()
    dense.save_pretrained(tmp_path / "base")
    return dense


def _load_4bit(path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu")


def test_bnb_4bit_model_keeps_its_weights(tmp_path):
    dense = _save_tiny_llama(tmp_path)
    model = _load_4bit(tmp_path / "base")
    expected = {}
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            expected[name] = bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state)
            # and our quantiser gives the very codes bitsandbytes stored when loading
            ours = nf4_quantize(dense.get_submodule(name).weight, 64, True)
            assert torch.equal(ours.packed, m.weight.data.view(torch.uint8))
    assert len(expected) == 14
    model = prepare(model, _cfg())
    layers = dict(_layers(model))
    assert layers.keys() == expected.keys()
    for name, layer in layers.items():
        assert torch.equal(layer.base_layer.dequantize(), expected[name]), name
    ids = models.batch()
    loss, grads = _loss_and_grads(model, ids)
    assert torch.isfinite(loss) and len(grads) == 28


def test_bnb_cpu_repacked_weights(tmp_path):
    """bitsandbytes repacks a 4-bit weight for CPU inference in eval mode (AVX512-BF16 CPUs), rounding
    its absmax to bf16; prepare keeps the weights bitsandbytes computes with from then on."""
    _save_tiny_llama(tmp_path)
    model = _load_4bit(tmp_path / "base").eval()
    layer = model.model.layers[0].mlp.down_proj
    st = layer.weight.quant_state
    codes = layer.weight.data.reshape(-1)
    codes = torch.stack([codes >> 4, codes & 0xF], 1).reshape(-1).long()
    absmax = (bnbf.dequantize_blockwise(st.absmax, st.state2) + st.offset).bfloat16().float()
    expected = (st.code[codes] * absmax.repeat_interleave(64)).reshape(layer.out_features, layer.in_features)
    with torch.no_grad():
        model(input_ids=models.batch())
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack on this CPU")
    model = prepare(model, _cfg())
    assert torch.equal(model.model.layers[0].mlp.down_proj.base_layer.dequantize(), expected)


def test_from_peft_model_same_outputs():
    ids = models.batch()
    peft_model = models.tiny_lora_llama(r=R_MAX)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    model = prepare(peft_model, _cfg(quant="none", r_max=2 * R_MAX))
    assert type(model).__name__ == "LlamaForCausalLM" and len(_layers(model)) == 14
    assert get_rank(model) == R_MAX  # the PEFT rank, inside r_max = 2 R_MAX
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-6, rtol=0)


def test_from_peft_on_bnb_base(tmp_path):
    from peft import LoraConfig, get_peft_model

    _save_tiny_llama(tmp_path)
    # train mode: in eval mode bitsandbytes would repack the weights for CPU inference on the first call
    peft_model = get_peft_model(_load_4bit(tmp_path / "base").train(),
                                LoraConfig(r=R_MAX, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    ids = models.batch()
    expected = peft_model(input_ids=ids).logits.detach()
    bases = {n.removeprefix("base_model.model.").removesuffix(".base_layer"):
             bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state)
             for n, m in peft_model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    model = prepare(peft_model, _cfg(targets=["q_proj", "v_proj"]))
    for name, layer in _layers(model):
        assert torch.equal(layer.base_layer.dequantize(), bases[name])
    assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_export_peft_adapter_and_merge(tmp_path):
    from peft import PeftModel

    ids = models.batch()
    model = prepare(models.tiny_llama(), _cfg(quant="none", dropout=0.1))
    model.train()
    _randomise_b(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    sampler = RankSampler(model)
    for _ in range(3):
        sampler.step()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    set_rank(model, 2)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    export_peft_adapter(model, tmp_path / "adapter", rank=2)
    loaded = PeftModel.from_pretrained(models.tiny_llama(), tmp_path / "adapter").eval()
    assert loaded.peft_config["default"].r == 2
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        merged = merge_lora(model, rank=2)
        assert not _layers(merged)
        assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="rank"):
        export_peft_adapter(prepare(models.tiny_llama(), _cfg()), tmp_path / "bad", rank=R_MAX + 1)


def test_merge_nf4_model():
    ids = models.batch()
    model = prepare(models.tiny_llama(), _cfg())
    _randomise_b(model)
    set_rank(model, 3)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        merged = merge_lora(model)
        assert merged.model.layers[0].mlp.gate_proj.weight.dtype == torch.float32
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def _matmul_dtypes(fn, shapes: bool = False) -> set:
    """The dtypes every matmul in ``fn()``'s forward and backward reads; with ``shapes``, each matmul's
    ``(dtype, operand shapes)``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()
    mms = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in mms:
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                if shapes:
                    seen.update((a.dtype, tuple(tuple(t.shape) for t in tensors)) for a in tensors)
                else:
                    seen.update(a.dtype for a in tensors)
            return func(*args, **(kwargs or {}))

    with Mode():
        fn()
    return seen


@pytest.mark.parametrize("frozen", [False, True])
def test_input_compute_dtype_runs_the_adapter_in_bf16_within_its_round_off(frozen):
    """``compute_dtype="input"``: with a bf16 input every matmul of the step is bf16 (with the default,
    fp32 ones run), the adapters and their gradients stay fp32, and output and gradients are DyLoRA's
    formulas (fp64 here) within bf16 round-off."""
    torch.manual_seed(0)
    r_max, alpha, b = 6, 12.0, 4
    base = nn.Linear(64, 48, dtype=torch.bfloat16)
    layers = {c: LoRALinear(NF4Linear.from_linear(base), r_max, alpha, frozen=frozen, compute_dtype=c)
              for c in ("float32", "input")}
    with torch.no_grad():
        layers["float32"].lora_B.normal_()
        layers["input"].load_state_dict(layers["float32"].state_dict())
    x, g = torch.randn(32, 64, dtype=torch.bfloat16), torch.randn(32, 48, dtype=torch.bfloat16)
    for layer in layers.values():
        layer.set_rank(b)

    def step(layer):
        layer.zero_grad()
        layer(x).backward(g)

    assert torch.float32 in _matmul_dtypes(lambda: step(layers["float32"]))
    layer = layers["input"]
    assert _matmul_dtypes(lambda: step(layer)) == {torch.bfloat16}
    assert layer.lora_A.dtype == layer.lora_A.grad.dtype == torch.float32
    s = alpha / b
    xd, gd = x.double(), g.double()
    a, bm = layer.lora_A.detach().double()[:b], layer.lora_B.detach().double()[:, :b]
    y_ref = xd @ layer.base_layer.dequantize().double().t() + base.bias.detach().double() + s * (xd @ a.t()) @ bm.t()
    da, db = s * (gd @ bm).t() @ xd, s * gd.t() @ (xd @ a.t())
    if frozen:
        da[: b - 1], db[:, : b - 1] = 0, 0
    close = dict(rtol=2e-2, atol=2e-2 * float(y_ref.abs().max()))
    torch.testing.assert_close(layer(x).double(), y_ref, **close)
    torch.testing.assert_close(layer.lora_A.grad[:b].double(), da, rtol=2e-2, atol=2e-2 * float(da.abs().max()))
    torch.testing.assert_close(layer.lora_B.grad[:, :b].double(), db, rtol=2e-2, atol=2e-2 * float(db.abs().max()))
    assert not layer.lora_A.grad[b:].any() and not layer.lora_B.grad[:, b:].any()


def test_compute_dtype_is_an_option_of_prepare():
    """Through ``prepare``, on a whole bf16 model: no adapter matmul (an operand with the adapters' rank,
    7, in its shape) runs in fp32. The model's own fp32 matmuls (rotary frequencies, in some
    transformers versions) are not the adapters'."""
    ids = models.batch()

    def adapter_matmul_dtypes(compute_dtype):
        model = prepare(models.tiny_llama().to(torch.bfloat16), _cfg(compute_dtype=compute_dtype, r_max=7))
        assert {m.compute_dtype for _, m in _layers(model)} == {compute_dtype}
        seen = _matmul_dtypes(lambda: model(input_ids=ids, labels=ids).loss.backward(), shapes=True)
        return {dtype for dtype, shapes in seen if any(7 in shape for shape in shapes)}

    assert adapter_matmul_dtypes("float32") == {torch.float32}
    assert adapter_matmul_dtypes("input") == {torch.bfloat16}
    with pytest.raises(ValueError, match="compute_dtype"):
        prepare(models.tiny_llama(), _cfg(compute_dtype="bf16"))
