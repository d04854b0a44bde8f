"""``cross_entropy``: ``F.cross_entropy(x.float(), target)`` without an fp32 copy of ``x``, as the ops
``memtrain::cross_entropy_forward`` (loss and log-sum-exp) and ``memtrain::cross_entropy_backward``.

Language models upcast their logits before the loss (Hugging Face: ``logits.float()``), and
``log_softmax`` then keeps a second (tokens x vocab) fp32 tensor for the backward: at 8192 tokens and a
32k vocabulary, 2 GiB on top of the 0.5 GiB bf16 logits. This op reads the logits in their own dtype,
computes in fp32 row by row (a Triton program per row on CUDA, chunks of rows in the torch reference),
and saves only the log-sum-exp per row (4 bytes a token). The backward writes the logits' gradient
``(softmax(x) - onehot(target)) * g`` straight in ``x.dtype``.

Exact up to fp32 round-off: the same formula as ``log_softmax`` + ``nll_loss`` in fp32, summed in a
different order. Supports ``reduction`` ``"mean"`` (over targets that are not ``ignore_index``, as
torch) and ``"sum"``; no class weights, no label smoothing.
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, autotune, tl, triton, use_triton

REDUCTIONS = ("mean", "sum")
CHUNK_ELEMENTS = 1 << 24  # the reference's fp32 working set: 64 MiB


def _check(x: torch.Tensor, target: torch.Tensor, reduction: str) -> None:
    if x.dim() != 2 or target.shape != x.shape[:1]:
        raise ValueError(f"memtrain::cross_entropy_forward: expected logits (N, V) and target (N,), got "
                         f"{tuple(x.shape)} and {tuple(target.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"memtrain::cross_entropy_forward: reduction {reduction!r} not supported; "
                         f"valid: {REDUCTIONS}")


def _scale(target: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """What each row's loss is multiplied by: 1, or 1 / (rows that count) for ``"mean"`` (fp32, 0-d)."""
    if reduction == "sum":
        return torch.ones((), dtype=torch.float32, device=target.device)
    return 1.0 / (target != ignore_index).sum().to(torch.float32)


def rows_per_chunk(v: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(v, 1))


def cross_entropy_ref(x: torch.Tensor, target: torch.Tensor, ignore_index: int,
                      reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``(loss, lse)``, in chunks of rows, fp32."""
    _check(x, target, reduction)
    lse = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    step = rows_per_chunk(x.shape[1])
    for i in range(0, x.shape[0], step):
        xs, ts = x[i:i + step].float(), target[i:i + step]
        lse_s = torch.logsumexp(xs, dim=1)
        valid = ts != ignore_index
        picked = xs.gather(1, torch.where(valid, ts, 0).unsqueeze(1)).squeeze(1)
        total = total + torch.where(valid, lse_s - picked, 0.0).sum()
        lse[i:i + step] = lse_s
    return total * _scale(target, ignore_index, reduction), lse


def softmax_grad(xs: torch.Tensor, ts: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                 ignore_index: int) -> torch.Tensor:
    """``(softmax(xs) - onehot(ts)) * g`` for fp32 rows ``xs`` with their log-sum-exp; 0 on ignored rows.
    ``g``: the loss gradient times the reduction's scale (fp32, 0-d)."""
    valid = ts != ignore_index
    p = torch.exp(xs - lse.unsqueeze(1))
    p.scatter_add_(1, torch.where(valid, ts, 0).unsqueeze(1), torch.where(valid, -1.0, 0.0).unsqueeze(1))
    return p * torch.where(valid, g, 0.0).unsqueeze(1)


def grad_scale(grad: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """The upstream loss gradient times the reduction's scale (fp32, 0-d)."""
    return grad.float() * _scale(target, ignore_index, reduction)


def cross_entropy_backward_ref(grad: torch.Tensor, x: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                               ignore_index: int, reduction: str) -> torch.Tensor:
    """Reference: ``(softmax(x) - onehot(target)) * grad * scale`` per row, in ``x.dtype``."""
    g = grad_scale(grad, target, ignore_index, reduction)
    out = torch.empty_like(x)
    step = rows_per_chunk(x.shape[1])
    for i in range(0, x.shape[0], step):
        p = softmax_grad(x[i:i + step].float(), target[i:i + step], lse[i:i + step], g, ignore_index)
        out[i:i + step] = p.to(x.dtype)
    return out


if HAS_TRITON:
    # One program per row, looping over the vocabulary: wider blocks need more warps to keep the loads in
    # flight; the list is short so the first call of each vocabulary size tunes in well under a second.
    _CE_CONFIGS = [triton.Config({"BLOCK": 1024}, num_warps=4), triton.Config({"BLOCK": 2048}, num_warps=8),
                   triton.Config({"BLOCK": 4096}, num_warps=8), triton.Config({"BLOCK": 4096}, num_warps=16)]
    _CE_INTERPRETER = triton.Config({"BLOCK": 4096}, num_warps=4)

    @autotune(_CE_CONFIGS, _CE_INTERPRETER, key=["V"])
    @triton.jit
    def _ce_forward_kernel(x_ptr, stride, target_ptr, loss_ptr, lse_ptr, V, ignore_index, BLOCK: tl.constexpr):
        # grid: (N,). One row: online max and sum of exp over blocks of the vocabulary.
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * stride
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        t = tl.load(target_ptr + row)
        valid = t != ignore_index
        picked = tl.load(base + tl.where(valid, t, 0)).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0))
        tl.store(lse_ptr + row, lse)

    @autotune(_CE_CONFIGS, _CE_INTERPRETER, key=["V"])
    @triton.jit
    def _ce_backward_kernel(x_ptr, stride, target_ptr, lse_ptr, scale_ptr, grad_ptr, out_ptr, out_stride, V,
                            ignore_index, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        t = tl.load(target_ptr + row)
        valid = t != ignore_index
        g = tl.load(grad_ptr).to(tl.float32) * tl.load(scale_ptr)
        g = tl.where(valid, g, 0.0)
        lse = tl.load(lse_ptr + row)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse) - tl.where(cols == t, 1.0, 0.0)
            tl.store(out_ptr + row * out_stride + cols, (p * g).to(out_ptr.dtype.element_ty), mask=mask)


def cross_entropy_triton(x: torch.Tensor, target: torch.Tensor, ignore_index: int,
                         reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, target, reduction)
    x = x if x.stride(1) == 1 else x.contiguous()
    n, v = x.shape
    losses = torch.empty(n, dtype=torch.float32, device=x.device)
    lse = torch.empty(n, dtype=torch.float32, device=x.device)
    if n:
        _ce_forward_kernel[(n,)](x, x.stride(0), target, losses, lse, v, ignore_index)
    return losses.sum() * _scale(target, ignore_index, reduction), lse


def cross_entropy_backward_triton(grad: torch.Tensor, x: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                                  ignore_index: int, reduction: str) -> torch.Tensor:
    x = x if x.stride(1) == 1 else x.contiguous()
    n, v = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    scale = _scale(target, ignore_index, reduction)
    if n:
        _ce_backward_kernel[(n,)](x, x.stride(0), target, lse, scale, grad.float().contiguous(), out, out.stride(0),
                                  v, ignore_index)
    return out


def loss_and_lse(x: torch.Tensor, target: torch.Tensor, ignore_index: int,
                 reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward on this device: the Triton kernel where it runs, else the reference."""
    if use_triton(x.device):
        return cross_entropy_triton(x, target, ignore_index, reduction)
    return cross_entropy_ref(x, target, ignore_index, reduction)


@torch.library.custom_op("memtrain::cross_entropy_forward", mutates_args=())
def cross_entropy_forward(x: torch.Tensor, target: torch.Tensor, ignore_index: int,
                          reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, lse)``: the fp32 loss and each row's log-sum-exp (kept for the backward)."""
    return loss_and_lse(x, target, ignore_index, reduction)


@cross_entropy_forward.register_fake
def _(x, target, ignore_index, reduction):
    _check(x, target, reduction)
    return x.new_empty((), dtype=torch.float32), x.new_empty(x.shape[:1], dtype=torch.float32)


@torch.library.custom_op("memtrain::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(grad: torch.Tensor, x: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                           ignore_index: int, reduction: str) -> torch.Tensor:
    """The gradient of the loss with respect to ``x``, in ``x.dtype``."""
    if use_triton(x.device):
        return cross_entropy_backward_triton(grad, x, target, lse, ignore_index, reduction)
    return cross_entropy_backward_ref(grad, x, target, lse, ignore_index, reduction)


@cross_entropy_backward.register_fake
def _(grad, x, target, lse, ignore_index, reduction):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, target, ctx.ignore_index, ctx.reduction = inputs
    ctx.save_for_backward(x, target, output[1])


def _backward(ctx, grad_loss, grad_lse):
    x, target, lse = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = cross_entropy_backward(grad_loss, x, target, lse, ctx.ignore_index, ctx.reduction)
    return grad_x, None, None, None


cross_entropy_forward.register_autograd(_backward, setup_context=_setup_context)


def cross_entropy(x: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(x.float(), target, ignore_index=..., reduction=...)`` for logits ``x`` (N, V)."""
    return cross_entropy_forward(x, target, ignore_index, reduction)[0]
