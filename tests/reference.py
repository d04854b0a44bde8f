"""Independent eager references of the methods' weight-gradient formulas, for the tests.

Written from the papers' formulas, not from the pass: capture each layer's input ``x`` and output
gradient ``g`` in an eager run, rebuild ``x_hat`` and compute ``grad_W = g^T @ x_hat``.
"""
from __future__ import annotations

import math

import torch


def capture(model: torch.nn.Module, names: list[str]):
    """Forward hooks that record ``x`` (2-D) and ``grad_out`` (2-D) of the named modules."""
    store, handles = {}, []
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    assert not missing, f"no modules named {missing}"
    for name in names:
        def hook(mod, inp, out, name=name):
            x = inp[0].detach()
            store[name] = {"x": x.reshape(-1, x.shape[-1])}
            out.register_hook(lambda g: store[name].__setitem__("g", g.detach().reshape(-1, g.shape[-1])))
        handles.append(modules[name].register_forward_hook(hook))
    return store, handles


def velora_x_hat(x: torch.Tensor, groups: int, scale: float, v: torch.Tensor | None = None):
    """VeLoRA: sub-tokens of size ceil(D/G) (zero-padded), v = unit mean sub-token, x_hat = (z . v) v^T."""
    n, d = x.shape
    m = math.ceil(d / groups)
    xp = torch.zeros(n, m * groups, dtype=torch.float64)
    xp[:, :d] = x.double()
    sub = xp.reshape(n * groups, m)
    if v is None:
        v = sub.mean(0)
        v = v / v.norm()
    v = v.double()
    z = sub @ v
    return (z[:, None] * v[None, :]).reshape(n, m * groups)[:, :d] * scale, v


def compact_x_hat(x: torch.Tensor, seed: int, r: int):
    """CompAct: P ~ N(0, 1/r) from the seed (generator on CPU), x_hat = x P P^T."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(x.shape[1], r, generator=gen) / math.sqrt(r)
    p = p.to(x.dtype).double()
    return (x.double() @ p) @ p.t()


def linear_wgrad(g: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """``nn.Linear`` weight gradient (out, in) = g^T x_hat."""
    assert g.shape[0] == x_hat.shape[0], (g.shape, x_hat.shape)
    return g.double().t() @ x_hat


def conv1d_wgrad(g: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """GPT-2 ``Conv1D`` weight gradient (in, out) = x_hat^T g."""
    assert g.shape[0] == x_hat.shape[0], (g.shape, x_hat.shape)
    return x_hat.t() @ g.double()
