"""Fira with backend="memtrain": refused where the backend approximates a Fira-managed gradient."""
import pytest
import torch

from memcompile.optim import Fira, fira_param_groups
from tests import models


@pytest.mark.parametrize("activation", ["none", "compact"])
def test_fira_refuses_weights_whose_gradient_the_backend_approximates(activation):
    model, ids = models.tiny_llama(layers=1), models.batch()
    opt = Fira(fira_param_groups(model, rank=8, update_proj_gap=10), lr=1e-3)
    compiled = torch.compile(model, backend="memtrain", options={"compiler": "aot_eager", "activation": activation})
    compiled(input_ids=ids, labels=ids).loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    if activation == "none":
        opt.step()
        assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    else:
        with pytest.raises(ValueError, match="'compact' approximation"):
            opt.step()
        assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
