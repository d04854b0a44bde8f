import pytest
import torch
import torch.nn.functional as F

from memcompile.kernels import cross_entropy as ce
from memcompile.kernels import linear_cross_entropy as lce


def _case(n=29, d=24, v=70, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen).to(dtype)
    w = (torch.randn(v, d, generator=gen) / d**0.5).to(dtype)
    t = torch.randint(0, v, (n,), generator=gen)
    t[[i for i in (2, 11) if i < n]] = -100
    return h, w, t


def _unfused(h, w, t, reduction, logits_weight):
    """The independent reference in float64: torch's linear and loss, plus an optional second use of
    the logits, differentiated by autograd."""
    h, w = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    logits = F.linear(h, w)
    loss = F.cross_entropy(logits, t, ignore_index=-100, reduction=reduction)
    total = loss + (logits_weight * logits.square()).sum() if logits_weight is not None else loss
    total.backward()
    return loss, logits, h.grad, w.grad


@pytest.mark.parametrize("reduction", ce.REDUCTIONS)
@pytest.mark.parametrize("logits_used", [False, True])
@pytest.mark.parametrize("w_trains", [False, True])
def test_matches_unfused_linear_and_loss(reduction, logits_used, w_trains, monkeypatch):
    monkeypatch.setattr(ce, "CHUNK_ELEMENTS", 70 * 8)  # 8 rows per chunk: 4 chunks and a remainder
    h, w, t = _case()
    weight = torch.linspace(-1, 1, 70) if logits_used else None
    loss_e, logits_e, gh_e, gw_e = _unfused(h, w, t, reduction, weight)
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_(w_trains)
    loss, logits = lce.linear_cross_entropy(h, w, t, reduction=reduction)
    total = loss + (weight * logits.square()).sum() if logits_used else loss
    total.backward()
    torch.testing.assert_close(loss.double(), loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.double(), logits_e, rtol=1e-5, atol=1e-6)
    # fp32 against float64: a few ulps of the largest gradient entries
    torch.testing.assert_close(h.grad.double(), gh_e, rtol=1e-5, atol=5e-6)
    if w_trains:
        torch.testing.assert_close(w.grad.double(), gw_e, rtol=1e-5, atol=5e-6)
    else:
        assert w.grad is None


def test_bf16_matches_the_unfused_bf16_path():
    h, w, t = _case(dtype=torch.bfloat16)
    h1 = h.clone().requires_grad_()
    loss, _ = lce.linear_cross_entropy(h1, w, t)
    loss.backward()
    h2 = h.clone().requires_grad_()
    ref = F.cross_entropy(F.linear(h2, w).float(), t)  # what a Hugging Face model computes
    ref.backward()
    assert h1.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h1.grad.float(), h2.grad.float(), rtol=2e-2, atol=2e-3)


def test_saves_no_logits():
    h, w, t = _case(dtype=torch.bfloat16)
    h.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        loss, logits = lce.linear_cross_entropy(h, w, t)
    assert sorted(tuple(s.shape) for s in saved) == sorted([(29, 24), (70, 24), (29,), (29,)])


def test_bad_input_is_an_error():
    h, w, t = _case()
    with pytest.raises(ValueError, match="expected h"):
        lce.linear_cross_entropy(h, w.t(), t)
    with pytest.raises(ValueError, match="reduction"):
        lce.linear_cross_entropy(h, w, t, reduction="none")


def test_opcheck():
    h, w, t = _case(n=5, d=4, v=9)
    torch.library.opcheck(torch.ops.memtrain.linear_cross_entropy_forward.default,
                          (h.requires_grad_(), w.requires_grad_(), t, -100, "sum"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.gpu
def test_cuda_matches_unfused():
    h, w, t = _case(n=1024, d=256, v=32000, dtype=torch.bfloat16)
    h, w, t = h.cuda().requires_grad_(), w.cuda(), t.cuda()
    loss, _ = lce.linear_cross_entropy(h, w, t)
    loss.backward()
    h2 = h.detach().clone().requires_grad_()
    ref = F.cross_entropy(F.linear(h2, w).float(), t)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.grad.float(), h2.grad.float(), rtol=2e-2, atol=2e-3)
