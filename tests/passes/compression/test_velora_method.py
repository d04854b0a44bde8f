"""The VeLoRA method on its own: its check, and its projection and weight gradients against the
float64 reference (tests/reference.py)."""
import torch

from memcompile.passes.compression import METHODS, Group, velora
from tests import reference


def _plan(n, d, groups):
    return velora.plan(velora.VeLoRAConfig(num_groups=groups, scale=0.5),
                       Group("layers.0.mlp.down_proj", n, d, torch.float32, torch.device("cpu"), False))


def test_registered_with_its_defaults():
    method = METHODS["velora"]
    assert method is velora.METHOD and method.config is velora.VeLoRAConfig
    assert "lora_A" in method.targets and "lm_head" in method.exclude
    assert method.check(velora.VeLoRAConfig(num_groups=8), 4) == "num_groups 8 > input width 4"
    assert method.check(velora.VeLoRAConfig(num_groups=4), 4) is None


def test_weight_gradients_match_the_reference():
    torch.manual_seed(0)
    n, d, o, groups = 6, 10, 3, 4  # 10 is not a multiple of 4: the last sub-token is zero-padded
    x, g, owner = torch.randn(n, d), torch.randn(n, o), torch.nn.Parameter(torch.randn(o, d))
    plan = _plan(n, d, groups)
    z, v = plan.project(x, owner)
    assert z.shape == (n, plan.width) == (n, groups) and plan.state_bytes == 4 * 3
    x_hat, v_ref = reference.velora_x_hat(x, groups, 0.5)
    torch.testing.assert_close(v.double(), v_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(plan.weight_grad(g.t(), z, v).double(), reference.linear_wgrad(g, x_hat),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plan.weight_grad_conv1d(g, z, v).double(), reference.conv1d_wgrad(g, x_hat),
                               rtol=1e-5, atol=1e-5)
    # v is the owner's from now on (batch_average_once)
    _, v2 = plan.project(torch.randn(n, d), owner)
    assert torch.equal(v2, v)
