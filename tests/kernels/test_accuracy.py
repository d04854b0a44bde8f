"""Every Triton kernel against an fp64 truth, with a tolerance that follows from torch itself.

For a low-precision dtype a fixed ``rtol``/``atol`` either hides a real error or fails on rounding
noise. Here the kernel's error against the fp64 truth must be no worse than the error of torch's own
computation in the same dtype, plus one unit in the last place of that dtype at the output's scale
(two correct roundings can differ by that much). Both the largest and the mean error are compared.

Sizes are not multiples of any block: a 32003-token vocabulary, widths of 4099, a single row. On CPU
the kernels run in Triton's interpreter; the same tests run natively on CUDA (``pytest -m gpu``),
together with a few larger sizes.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from memcompile.kernels import cross_entropy as ce
from memcompile.kernels import linear_cross_entropy as lce
from memcompile.kernels import random_projection as rp
from memcompile.kernels._triton import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
LOW = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _triton_on_cpu(monkeypatch):
    # The ops launch their kernels on CPU tensors only when asked (and only in the interpreter).
    monkeypatch.setenv("MEMTRAIN_TRITON_ON_CPU", "1")


def errors(out: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """``(largest, mean)`` absolute error of ``out`` against the fp64 ``truth``."""
    e = (out.double() - truth).abs()
    return e.max().item(), e.mean().item()


def assert_no_worse_than_torch(ours: torch.Tensor, theirs: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype,
                               what: str) -> None:
    """``ours`` is within torch's own error (``theirs``, same dtype) of ``truth``, plus one ulp of ``dtype``
    at the scale of ``truth``."""
    assert ours.shape == theirs.shape == truth.shape, what
    ulp = torch.finfo(dtype).eps * truth.abs().max().item()
    ours_max, ours_mean = errors(ours, truth)
    theirs_max, theirs_mean = errors(theirs, truth)
    assert ours_max <= theirs_max + ulp, f"{what}: largest error {ours_max:.3g} > torch's {theirs_max:.3g} + {ulp:.3g}"
    assert ours_mean <= theirs_mean + ulp / 8, (f"{what}: mean error {ours_mean:.3g} > torch's {theirs_mean:.3g} + "
                                                f"{ulp / 8:.3g}")


def _logits(n: int, v: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, v, generator=gen) * 3).to(dtype).to(device)
    t = torch.randint(0, v, (n,), generator=gen)
    if n > 2:
        t[1] = -100
    return x, t.to(device)


def _torch_ce(x: torch.Tensor, t: torch.Tensor, reduction: str):
    """torch's loss and logits gradient computed in ``x``'s own dtype, and the fp64 truth."""
    xl = x.detach().clone().requires_grad_()
    loss = F.cross_entropy(xl, t, reduction=reduction)
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    truth = F.cross_entropy(x64, t, reduction=reduction)
    truth.backward()
    return loss.detach(), xl.grad, truth.detach(), x64.grad


SIZES = [(1, 32003), (3, 32003), (5, 4099)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("n, v", SIZES)
@pytest.mark.parametrize("reduction", ce.REDUCTIONS)
def test_cross_entropy_no_worse_than_torch(device, dtype, n, v, reduction):
    x, t = _logits(n, v, dtype, device)
    loss, lse = ce.cross_entropy_triton(x, t, -100, reduction)
    grad = ce.cross_entropy_backward_triton(torch.ones((), device=device), x, t, lse, -100, reduction)
    t_loss, t_grad, truth, truth_grad = _torch_ce(x, t, reduction)
    assert grad.dtype == dtype
    assert_no_worse_than_torch(loss.reshape(1), t_loss.reshape(1), truth.reshape(1), dtype, "loss")
    assert_no_worse_than_torch(lse, torch.logsumexp(x.float(), 1), torch.logsumexp(x.double(), 1), torch.float32,
                               "log-sum-exp")  # kept in fp32: held to fp32's own error
    assert_no_worse_than_torch(grad, t_grad, truth_grad, dtype, "gradient")
    if n > 2:
        assert (grad[1] == 0).all()  # the ignored row


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("n, d, v", [(1, 64, 32003), (7, 4099, 1031)])
def test_linear_cross_entropy_no_worse_than_torch(device, dtype, n, d, v):
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(n, d, generator=gen).to(dtype).to(device)
    w = (torch.randn(v, d, generator=gen) / math.sqrt(d)).to(dtype).to(device)
    t = torch.randint(0, v, (n,), generator=gen).to(device)
    # Ours: the op (its forward runs the Triton loss; its backward recomputes the logits by chunks).
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _ = lce.linear_cross_entropy(h1, w1, t)
    loss.backward()
    # torch in the same dtype, the way a Hugging Face model computes it: F.linear, then the upcast loss.
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.cross_entropy(F.linear(h2, w2).float(), t)
    ref.backward()
    h3, w3 = h.double().requires_grad_(), w.double().requires_grad_()
    truth = F.cross_entropy(F.linear(h3, w3), t)
    truth.backward()
    assert_no_worse_than_torch(loss.reshape(1), ref.detach().reshape(1), truth.detach().reshape(1), dtype, "loss")
    assert_no_worse_than_torch(h1.grad, h2.grad, h3.grad, dtype, "grad h")
    assert_no_worse_than_torch(w1.grad, w2.grad, w3.grad, dtype, "grad W")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 4099), (3, 4099), (4099, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_nf4_dequant_exact_at_odd_sizes(device, shape, dtype):
    """Dequantisation has one rounding (fp32 -> dtype) in both paths: the kernel equals the reference."""
    from memcompile.quant.nf4.nf4_dequant import nf4_dequant_ref, nf4_dequant_triton
    from memcompile.quant.nf4.nf4_quant import nf4_quantize

    torch.manual_seed(shape[1])
    w = torch.randn(shape, device=device) * 0.02
    q = nf4_quantize(w, blocksize=64, double_quant=True)
    args = (*q.tensors(), *q.layout(), dtype)
    assert torch.equal(nf4_dequant_triton(*args), nf4_dequant_ref(*args))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, r", [(4099, 1), (4099, 17), (1, 3)])
def test_gaussian_sketch_at_odd_sizes(device, n, r):
    """Every element drawn (none left at the empty tensor's garbage), finite, reproducible, N(0, 1/r)."""
    p = rp.gaussian_sketch_triton(5, n, r, torch.float32, torch.device(device))
    assert p.shape == (n, r) and torch.isfinite(p).all() and (p != 0).all()
    assert torch.equal(p, rp.gaussian_sketch_triton(5, n, r, torch.float32, torch.device(device)))
    if n * r > 1000:
        assert abs(p.var().item() * r - 1) < 5 * math.sqrt(2 / (n * r))  # 5 standard errors of a variance


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW)
def test_cross_entropy_no_worse_than_torch_at_training_size(dtype):
    """The anchors' loss: 8192 tokens over a 32k vocabulary, plus three odd ones."""
    x, t = _logits(8192 + 3, 32003, dtype, "cuda")
    loss, lse = ce.cross_entropy_triton(x, t, -100, "mean")
    grad = ce.cross_entropy_backward_triton(torch.ones((), device="cuda"), x, t, lse, -100, "mean")
    t_loss, t_grad, truth, truth_grad = _torch_ce(x, t, "mean")
    assert_no_worse_than_torch(loss.reshape(1), t_loss.reshape(1), truth.reshape(1), dtype, "loss")
    assert_no_worse_than_torch(grad, t_grad, truth_grad, dtype, "gradient")
