"""QDyLoRA (prepare) and activation compression together under backend="memtrain"."""
import torch

import memcompile
from tests import models


def test_prepared_nf4_llama_with_velora_compresses_adapter_inputs_and_reports_nf4():
    model = memcompile.prepare(models.tiny_llama(), {"lora": {"r_max": 4, "alpha": 8, "quant": "nf4"}})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
    memcompile.set_rank(model, 3)
    ids = models.batch()
    calls = []

    def counting_backend(gm, example_inputs, **kw):
        calls.append(gm)
        return memcompile.memtrain(gm, example_inputs, options={"compiler": "aot_eager", "velora": {"num_groups": 8}})

    compiled = torch.compile(model, backend=counting_backend)
    loss_c = compiled(input_ids=ids, labels=ids).loss
    loss_c.backward()
    grads_c = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(calls) == 1  # one graph: no graph breaks
    rep = memcompile.report()
    groups = rep.passes["activation_compression"]["rewritten"]
    assert sorted(len(g["layers"]) for g in groups) == [1, 1, 2, 2, 3, 3]
    assert all(l.endswith(".lora_A") for g in groups for l in g["layers"])
    assert rep.bytes_before - rep.bytes_after == rep.predicted_saving > 0
    # every one of the 14 linears is NF4 with double quant: 4 bits a weight, an 8-bit absmax per 64,
    # an fp32 absmax per 256 blocks, the offset, and the two code tables (16 + 256 fp32)
    assert len(rep.quantized_layers) == 14
    for q in rep.quantized_layers:
        numel = q["shape"][0] * q["shape"][1]
        blocks = -(-numel // 64)
        assert q["bytes_before"] == 4 * numel
        assert q["bytes_after"] == numel // 2 + blocks + 4 * -(-blocks // 256) + 4 + 4 * (16 + 256)
    assert "quantized" in str(rep)

    model.zero_grad()
    loss_e = model(input_ids=ids, labels=ids).loss
    loss_e.backward()
    assert torch.equal(loss_c, loss_e)
    compressed = {l for g in groups for l in g["layers"]}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if name.removesuffix(".weight") in compressed or name in compressed:
            assert not torch.equal(grads_c[name], p.grad)  # approximated
        else:
            assert torch.equal(grads_c[name], p.grad), name  # lora_B: exact
