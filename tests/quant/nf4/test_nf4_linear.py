"""``memtrain::nf4_linear``: outputs and input gradients against the dequantised weight, and what the
autograd graph keeps for the backward (the packed codes, never a dense weight)."""
import pytest
import torch

from memcompile.quant.nf4.nf4_dequant import nf4_dequant_ref
from memcompile.quant.nf4.nf4_linear import nf4_linear
from memcompile.quant.nf4.nf4_quant import NESTED_BLOCKSIZE, nf4_quantize

OUT, IN = 37, 45  # odd: blocks straddle rows


def _state(double_quant=True):
    q = nf4_quantize(torch.randn(OUT, IN) * 0.05, blocksize=64, double_quant=double_quant)
    return q.tensors()


def _call(x, state, bias=None):
    return nf4_linear(x, *state, bias, [OUT, IN], 64, NESTED_BLOCKSIZE)


def _dense(state, dtype):
    return nf4_dequant_ref(*state, [OUT, IN], 64, NESTED_BLOCKSIZE, dtype)


@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_and_input_grad_exact(double_quant):
    torch.manual_seed(0)
    state = _state(double_quant)
    x = torch.randn(2, 5, IN, requires_grad=True)
    bias = torch.randn(OUT, requires_grad=True)
    g = torch.randn(2, 5, OUT)
    y = _call(x, state, bias)
    y.backward(g)
    w = _dense(state, torch.float32)
    assert torch.equal(y, torch.nn.functional.linear(x.detach(), w, bias.detach()))
    assert torch.equal(x.grad, g @ w)
    assert torch.allclose(bias.grad, g.sum((0, 1)))


def test_bf16_compute_dtype():
    state = _state()
    x = torch.randn(3, IN, dtype=torch.bfloat16, requires_grad=True)
    y = _call(x, state)
    assert y.dtype == torch.bfloat16
    w = _dense(state, torch.bfloat16)
    assert torch.equal(y, x.detach() @ w.t())
    y.backward(torch.ones_like(y))
    assert x.grad.dtype == torch.bfloat16 and torch.equal(x.grad, torch.ones_like(y) @ w)


def _saved_shapes(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t,
                                                  lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("compiled", [False, True])
def test_backward_keeps_no_dense_weight(compiled):
    state = _state()
    x = torch.randn(4, IN, requires_grad=True)
    fn = torch.compile(_call, backend="aot_eager", fullgraph=True) if compiled else _call
    saved = _saved_shapes(lambda: fn(x, state))
    assert saved, "nothing saved: the hook did not see the autograd graph"
    assert ((OUT, IN), torch.float32) not in saved and ((IN, OUT), torch.float32) not in saved
    assert ((state[0].shape[0], 1), torch.uint8) in saved  # the packed codes are what the backward reads
    y = fn(x, state)
    y.backward(torch.ones_like(y))
    assert torch.allclose(x.grad, torch.ones(4, OUT) @ _dense(state, torch.float32))


def test_opcheck():
    state = _state()
    x = torch.randn(3, IN, requires_grad=True)
    torch.library.opcheck(nf4_linear, (x, *state, torch.randn(OUT, requires_grad=True), [OUT, IN], 64,
                                       NESTED_BLOCKSIZE))
    torch.library.opcheck(nf4_linear, (torch.randn(2, 3, IN), *_state(False), None, [OUT, IN], 64, NESTED_BLOCKSIZE))


@pytest.mark.slow
def test_inductor_compiles_around_the_op():
    """The op stays opaque inside an Inductor graph (fake kernel, autograd formula), next to fused code."""
    state = _state()
    x = torch.randn(4, IN, requires_grad=True)

    def fn(x):
        return torch.nn.functional.gelu(_call(x, state)) * 2.0

    y = torch.compile(fn, backend="inductor", fullgraph=True)(x)
    y.sum().backward()
    w = _dense(state, torch.float32)
    xe = x.detach().clone().requires_grad_()
    ye = torch.nn.functional.gelu(xe @ w.t()) * 2.0
    ye.sum().backward()
    assert torch.allclose(y, ye, atol=1e-5) and torch.allclose(x.grad, xe.grad, atol=1e-5)
