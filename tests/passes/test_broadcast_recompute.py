"""The broadcast-recompute pass: grouped-query attention's repeated keys/values are rebuilt in the
backward from the unrepeated tensor instead of being saved, exactly."""
import math

import pytest
import torch

import memcompile

B, HKV, REP, T, D = 2, 2, 4, 16, 8


class RepeatedKeys(torch.nn.Module):
    """``repeat_kv`` as Hugging Face writes it, feeding a product whose backward reads the copy."""

    def __init__(self):
        super().__init__()
        self.k = torch.nn.Linear(D, D)

    def forward(self, q, x):
        k = self.k(x)  # [B, HKV, T, D]
        k = k[:, :, None].expand(B, HKV, REP, T, D).reshape(B, HKV * REP, T, D)
        return (q @ k.transpose(-1, -2)).softmax(-1)


def _run(compiled, model, q, x):
    model.zero_grad(set_to_none=True)
    q = q.detach().requires_grad_()
    out = compiled(q, x)
    out.square().sum().backward()
    return out.detach(), q.grad, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_repeated_copy_is_recomputed_not_saved(compiler):
    torch.manual_seed(0)
    model = RepeatedKeys()
    q, x = torch.randn(B, HKV * REP, T, D), torch.randn(B, HKV, T, D)
    memcompile.clear_reports()
    compiled = torch.compile(model, backend="memtrain", options={"compiler": compiler})
    out_c, qg_c, grads_c = _run(compiled, model, q, x)
    out_e, qg_e, grads_e = _run(model, model, q, x)

    rep = memcompile.reports()[-1]
    counters = rep.passes["broadcast_recompute"]["counters"]
    assert counters["copies"] >= 1 and counters["bytes"] >= B * HKV * REP * T * D * 4
    # in whatever view the partitioner picks: the copy (B*HKV*REP*T*D elements) is not saved, its source is
    saved = [math.prod(s.shape) for s in rep.saved_after if not s.is_input and s.alias_of is None]
    assert B * HKV * REP * T * D not in saved and B * HKV * T * D in saved, [s.shape for s in rep.saved_after]
    # Inductor fuses, so its round-off differs from eager's; aot_eager runs the same ops.
    tol = dict(rtol=0, atol=0) if compiler == "aot_eager" else {}
    torch.testing.assert_close(out_c, out_e, **tol)
    torch.testing.assert_close(qg_c, qg_e, **tol)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], msg=name, **tol)
