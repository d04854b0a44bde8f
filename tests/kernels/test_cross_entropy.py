import pytest
import torch
import torch.nn.functional as F

from memcompile.kernels import cross_entropy as ce


def _case(n=37, v=300, dtype=torch.bfloat16, ignored=(3, 4, 20), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, v, generator=gen) * 3).to(dtype)
    t = torch.randint(0, v, (n,), generator=gen)
    t[list(ignored)] = -100
    return x, t


def _torch_loss_and_grad(x, t, reduction):
    """The independent reference: torch's own fp32 loss on the upcast logits, and its gradient."""
    xf = x.detach().double().requires_grad_()
    loss = F.cross_entropy(xf, t, ignore_index=-100, reduction=reduction)
    loss.backward()
    return loss, xf.grad


IMPLS = {"ref": (ce.cross_entropy_ref, ce.cross_entropy_backward_ref),
         "triton": (ce.cross_entropy_triton, ce.cross_entropy_backward_triton)}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("reduction", ce.REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_gradient_match_torch(impl, reduction, dtype, monkeypatch):
    if impl == "triton":
        pytest.importorskip("triton")
    # Small chunks, so the reference's chunk loop runs more than once, with a remainder.
    monkeypatch.setattr(ce, "CHUNK_ELEMENTS", 300 * 8)
    fwd, bwd = IMPLS[impl]
    x, t = _case(dtype=dtype)
    loss, lse = fwd(x, t, -100, reduction)
    expected, expected_grad = _torch_loss_and_grad(x, t, reduction)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(x.double(), 1), rtol=1e-5, atol=1e-5)
    grad = bwd(torch.tensor(1.5), x, t, lse, -100, reduction)
    assert grad.dtype == dtype and grad.shape == x.shape
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-3)
    torch.testing.assert_close(grad.double(), (1.5 * expected_grad).to(dtype).double(), **tol)
    assert (grad[[3, 4, 20]] == 0).all()


def test_autograd_through_the_op_and_no_fp32_copy_is_saved():
    x, t = _case(dtype=torch.bfloat16)
    x.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        loss = ce.cross_entropy(x, t)
    loss.backward()
    expected, expected_grad = _torch_loss_and_grad(x, t, "mean")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), expected_grad.to(torch.bfloat16).double(), rtol=1e-2, atol=2e-3)
    # The logits themselves, the targets and one fp32 number per row; nothing (N, V) in fp32.
    assert sorted((tuple(s.shape), str(s.dtype)) for s in saved) == sorted(
        [((37, 300), "torch.bfloat16"), ((37,), "torch.int64"), ((37,), "torch.float32")])


def test_every_target_ignored_is_nan_for_mean_like_torch():
    x, t = _case(n=4, ignored=(0, 1, 2, 3))
    assert torch.isnan(ce.cross_entropy(x, t)) and torch.isnan(F.cross_entropy(x.float(), t))
    assert ce.cross_entropy(x, t, reduction="sum") == 0


def test_bad_input_is_an_error():
    x, t = _case()
    with pytest.raises(ValueError, match="reduction"):
        ce.cross_entropy(x, t, reduction="none")
    with pytest.raises(ValueError, match="expected logits"):
        ce.cross_entropy(x.unsqueeze(0), t)


def test_opcheck():
    x, t = _case(n=6, v=50, dtype=torch.float32, ignored=(1,))
    torch.library.opcheck(torch.ops.memtrain.cross_entropy_forward.default, (x.requires_grad_(), t, -100, "mean"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.gpu
def test_cuda_kernel_matches_torch():
    x, t = _case(n=512, v=32000, dtype=torch.bfloat16)
    x, t = x.cuda().requires_grad_(), t.cuda()
    loss = ce.cross_entropy(x, t)
    loss.backward()
    expected, expected_grad = _torch_loss_and_grad(x.cpu(), t.cpu(), "mean")
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double().cpu(), expected_grad.to(torch.bfloat16).double(), rtol=1e-2, atol=2e-3)
