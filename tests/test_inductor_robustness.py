"""What users hit first under Inductor, the default compiler: batches whose length changes, and
compiles that must not copy the model."""
import pytest
import torch

import memcompile
from memcompile import _torch_compat as tc
from tests import models


def _count_parameter_copies(monkeypatch):
    copies = []
    original = torch.nn.Parameter.__deepcopy__

    def counting(self, memo):
        copies.append(self.numel())
        return original(self, memo)

    monkeypatch.setattr(torch.nn.Parameter, "__deepcopy__", counting)
    return copies


@pytest.mark.slow
def test_inductor_variable_lengths_train_without_copying_weights(monkeypatch):
    """Lengths drawn per batch: Dynamo recompiles once with a symbolic length and reuses that graph;
    no compile copies a parameter (Inductor deep-copies its config to build cache keys)."""
    copies = _count_parameter_copies(monkeypatch)
    model = models.tiny_lora_llama()
    compiled = torch.compile(model, backend="memtrain", options={"activation": "velora"})
    graphs = tc.dynamo_graph_count()
    for t in (16, 24, 40):
        ids = models.batch(t=t, seed=t)
        model.zero_grad(set_to_none=True)
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        ref = model(input_ids=ids, labels=ids).loss
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        for name, p in model.named_parameters():
            if p.grad is not None and "lora_A" not in name:  # lora_A: the compressed ones
                torch.testing.assert_close(compiled_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert tc.dynamo_graph_count() - graphs == 2  # the static first shape, then one dynamic graph
    assert memcompile.report().passes["activation_compression"]["rewritten"]
    assert copies == []


@pytest.mark.slow
def test_inductor_dynamic_from_the_start(monkeypatch):
    copies = _count_parameter_copies(monkeypatch)
    model = models.tiny_lora_llama(layers=1)
    compiled = torch.compile(model, backend="memtrain", dynamic=True, options={"activation": "compact"})
    for t in (12, 20):
        ids = models.batch(t=t, seed=t)
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.testing.assert_close(loss, model(input_ids=ids, labels=ids).loss, rtol=1e-5, atol=1e-6)
    assert len(memcompile.reports()) == 1
    assert memcompile.report().passes["activation_compression"]["rewritten"]
    assert copies == []
