"""``linear_cross_entropy``: the output projection and the loss in one op,
``memtrain::linear_cross_entropy_forward``: ``logits = h W^T`` and ``F.cross_entropy(logits.float(), target)``,
whose backward never holds the (tokens x vocab) gradient of the logits.

The forward returns the logits (the model's output) and the loss, and keeps ``h``, ``W`` and one
log-sum-exp per row. The backward recomputes the logits a chunk of rows at a time (one more
``h W^T``, about 2 % of a small Llama's step) and turns each chunk straight into its rows of
``grad_h = G W`` and, when ``W`` trains, its share of ``grad_W = G^T h``: the full ``G`` (0.5 GiB in bf16 at
8192 tokens and a 32k vocabulary) and the saved logits never coexist with the backward of the layers.
If the caller also backpropagates through the returned logits, that gradient is added chunk by chunk.

Exact up to round-off: the same formulas as ``F.linear`` + ``cross_entropy``; the softmax of each chunk
is computed in fp32 from logits in ``h.dtype``, as the unfused path does.
"""
from __future__ import annotations

from typing import Optional

import torch

from .cross_entropy import REDUCTIONS, grad_scale, loss_and_lse, rows_per_chunk, softmax_grad


def _check(h: torch.Tensor, w: torch.Tensor, target: torch.Tensor, reduction: str) -> None:
    if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1] or target.shape != h.shape[:1]:
        raise ValueError(f"memtrain::linear_cross_entropy_forward: expected h (N, D), W (V, D), target (N,); "
                         f"got {tuple(h.shape)}, {tuple(w.shape)}, {tuple(target.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"memtrain::linear_cross_entropy_forward: reduction {reduction!r} not supported; valid: "
                         f"{REDUCTIONS}")


@torch.library.custom_op("memtrain::linear_cross_entropy_forward", mutates_args=())
def linear_cross_entropy_forward(h: torch.Tensor, w: torch.Tensor, target: torch.Tensor, ignore_index: int,
                                 reduction: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, lse, logits)`` for ``logits = h W^T`` (in ``h.dtype``)."""
    _check(h, w, target, reduction)
    logits = h @ w.to(h.dtype).t()
    loss, lse = loss_and_lse(logits, target, ignore_index, reduction)
    return loss, lse, logits


@linear_cross_entropy_forward.register_fake
def _(h, w, target, ignore_index, reduction):
    _check(h, w, target, reduction)
    return (h.new_empty((), dtype=torch.float32), h.new_empty(h.shape[:1], dtype=torch.float32),
            h.new_empty((h.shape[0], w.shape[0])))


def linear_cross_entropy_backward(grad_loss: Optional[torch.Tensor], grad_logits: Optional[torch.Tensor],
                                  h: torch.Tensor, w: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                                  ignore_index: int, reduction: str, need_h: bool = True,
                                  need_w: bool = False) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(grad_h, grad_W)``, a chunk of rows at a time (see the module doc)."""
    wd = w.to(h.dtype)
    g = None if grad_loss is None else grad_scale(grad_loss, target, ignore_index, reduction)
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
    step = rows_per_chunk(w.shape[0])
    for i in range(0, h.shape[0], step):
        hs = h[i:i + step]
        if g is not None:
            gs = softmax_grad((hs @ wd.t()).float(), target[i:i + step], lse[i:i + step], g, ignore_index)
            if grad_logits is not None:
                gs = gs + grad_logits[i:i + step].float()
        else:
            gs = grad_logits[i:i + step].float()
        gs = gs.to(h.dtype)  # what the unfused path feeds its matmuls: the logits' gradient in h.dtype
        if need_h:
            grad_h[i:i + step] = gs @ wd
        if need_w:
            grad_w += (gs.t() @ hs).float()
    return grad_h, None if grad_w is None else grad_w.to(w.dtype)


def _setup_context(ctx, inputs, output):
    h, w, target, ctx.ignore_index, ctx.reduction = inputs
    ctx.save_for_backward(h, w, target, output[1])
    ctx.set_materialize_grads(False)  # an unused logits output sends no gradient: skip adding zeros


def _backward(ctx, grad_loss, grad_lse, grad_logits):
    h, w, target, lse = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if (grad_loss is None and grad_logits is None) or not (need_h or need_w):
        return None, None, None, None, None
    grad_h, grad_w = linear_cross_entropy_backward(grad_loss, grad_logits, h, w, target, lse, ctx.ignore_index,
                                                   ctx.reduction, need_h, need_w)
    return grad_h, grad_w, None, None, None


linear_cross_entropy_forward.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy_ref(h: torch.Tensor, w: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                             reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: what a Hugging Face causal LM computes, ``F.linear`` then the loss on the upcast logits."""
    logits = torch.nn.functional.linear(h, w.to(h.dtype))
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, w.shape[0]), target,
                                             ignore_index=ignore_index, reduction=reduction)
    return loss, logits


def linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, logits)``: ``F.cross_entropy(F.linear(h, W).float().view(-1, V), target)`` and
    ``F.linear(h, W)``, for ``h`` of shape (..., D) and ``target`` of shape (prod(...),)."""
    loss, _, logits = linear_cross_entropy_forward(h.reshape(-1, h.shape[-1]), w, target, ignore_index, reduction)
    return loss, logits.view(*h.shape[:-1], w.shape[0])
