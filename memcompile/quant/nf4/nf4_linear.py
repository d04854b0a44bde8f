"""``memtrain::nf4_linear``: ``y = x W^T + b`` with a frozen NF4 weight ``W`` that is never saved dense.

The forward dequantises ``W`` (``memtrain::nf4_dequant``) into a temporary, multiplies and drops it.
The autograd formula saves only the packed codes and the quantisation state, which are module buffers
held anyway, and dequantises again in the backward: ``grad_x = grad_y W``, exact with respect to the
dequantised weight. ``W`` is frozen, so there is no weight gradient; a bias that requires grad gets
``grad_y`` summed over the leading dimensions.

The op is opaque to the compiler on purpose: were the dequantisation a visible node, the partitioner
would be free to keep its (dense, 4-8x larger) output for the backward.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from memcompile._library import define_op
from memcompile.quant.nf4.nf4_dequant import dequantize, nf4_dequant
from memcompile.quant.nf4.nf4_quant import NF4Weight


class NF4LinearArgs(NamedTuple):
    """The op's arguments by name: where a caller builds a call, and where the autograd formula and the
    compile report read one back, so their positions are written down only here."""

    x: torch.Tensor
    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    nested_absmax: Optional[torch.Tensor]
    nested_code: Optional[torch.Tensor]
    nested_offset: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    shape: list[int]
    blocksize: int
    nested_blocksize: int

    @classmethod
    def of(cls, x, weight: NF4Weight, bias=None) -> "NF4LinearArgs":
        return cls(x, *weight.tensors(), bias, *weight.layout())

    @property
    def weight_tensors(self) -> tuple:
        """The weight's six tensors (``NF4Weight.tensors()``), the packed codes first."""
        return self[1:7]

    @property
    def layout(self) -> tuple:
        """``(shape, blocksize, nested_blocksize)``, as ``NF4Weight.layout()``."""
        return self[8:]


def _fake(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, bias, shape, blocksize,
          nested_blocksize):
    return x.new_empty((*x.shape[:-1], shape[0]))


def _setup_context(ctx, inputs, output):
    args = NF4LinearArgs(*inputs)
    # Inputs only (module buffers): saving them costs no memory. The dense weight is not among them.
    ctx.save_for_backward(*args.weight_tensors)
    ctx.layout = args.layout
    ctx.x_dtype = args.x.dtype
    ctx.bias_grad = args.bias is not None and args.bias.requires_grad
    ctx.bias_dtype = None if args.bias is None else args.bias.dtype


def _backward(ctx, grad):
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = nf4_dequant(*ctx.saved_tensors, *ctx.layout, ctx.x_dtype)
        grad_x = grad.to(ctx.x_dtype) @ w
    if ctx.bias_grad:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, None, None, grad_bias, None, None, None


def nf4_linear_ref(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                   nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                   nested_offset: Optional[torch.Tensor], bias: Optional[torch.Tensor], shape: list[int],
                   blocksize: int, nested_blocksize: int) -> torch.Tensor:
    """Reference: dequantise to ``x.dtype`` (the dequant op's body: no second trip through the
    dispatcher when the op's body runs this), then ``F.linear``."""
    w = dequantize(packed, absmax, code, nested_absmax, nested_code, nested_offset, shape, blocksize,
                   nested_blocksize, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


# ``x @ dequant(W)^T (+ bias)`` in ``x.dtype``; ``shape`` is ``[out_features, in_features]``. Once per NF4
# layer in every forward: registered without ``custom_op``'s per-call wrapper (``define_op``).
nf4_linear = define_op(
    "nf4_linear(Tensor x, Tensor packed, Tensor absmax, Tensor code, Tensor? nested_absmax, Tensor? nested_code, "
    "Tensor? nested_offset, Tensor? bias, SymInt[] shape, SymInt blocksize, SymInt nested_blocksize) -> Tensor",
    nf4_linear_ref, _fake, _backward, _setup_context)
