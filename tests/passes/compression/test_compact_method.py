"""The CompAct method on its own: its check, seeds, and weight gradients against the float64
reference (tests/reference.py)."""
import torch

from memcompile import activation_state
from memcompile.passes.compression import METHODS, Group, compact
from tests import reference


def test_registered_with_its_defaults():
    method = METHODS["compact"]
    assert method is compact.METHOD and method.config is compact.CompActConfig
    assert method.targets == ("*",) and "o_proj" in method.exclude
    assert method.check(compact.CompActConfig(rank=8), 8).startswith("compact.rank 8 leaves the input width 8")
    assert method.check(compact.CompActConfig(rank=0.5), 8) is None
    assert "compact.rank=8" in method.skip_warning(compact.CompActConfig(rank=8), ["a", "b"])


def test_weight_gradients_match_the_reference():
    torch.manual_seed(0)
    n, d, o = 6, 16, 3
    x, g, owner = torch.randn(n, d), torch.randn(n, o), torch.nn.Parameter(torch.randn(o, d))
    config = compact.CompActConfig(rank=0.25, seed=3)
    plan = compact.plan(config, Group("model.layers.2.mlp.up_proj", n, d, torch.float32, torch.device("cpu"), False))
    z, seed = plan.project(x, owner)
    assert z.shape == (n, plan.width) == (n, 4) and plan.state_bytes == 8
    assert int(seed) == compact.layer_seed("mlp.up_proj", 3, 2)
    x_hat = reference.compact_x_hat(x, int(seed), 4)
    torch.testing.assert_close(plan.weight_grad(g.t(), z, seed).double(), reference.linear_wgrad(g, x_hat),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plan.weight_grad_conv1d(g, z, seed).double(), reference.conv1d_wgrad(g, x_hat),
                               rtol=1e-5, atol=1e-5)
    assert activation_state.state_dict(torch.nn.ParameterList([owner]))["0"]["compact_calls"] == 1
