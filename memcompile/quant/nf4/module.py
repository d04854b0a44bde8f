"""``NF4Linear``: a frozen linear layer stored in NF4 (bitsandbytes layout, optional double quant).

The layer owns only the packed codes and the quantisation state; no dense copy of the weight exists
between calls. The uint8 state (the codes, and the absmax under double quantisation: 99.9% of the
bytes) is held as frozen parameters, so FSDP2 (``fully_shard``) shards it on dim 0 and all-gathers it
as packed bytes; the fp32 state stays in buffers (see ``_STATE``). Its forward is
``memtrain::nf4_linear``, which dequantises into a temporary in the forward and again in the backward.

Build one from a dense ``nn.Linear`` (quantised here, bit-identical to bitsandbytes) or from a
``bitsandbytes.nn.Linear4bit`` whose weight is already quantised (codes and state taken over as they are).
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from memcompile.quant.base import QuantizedLinear
from memcompile.quant.nf4.nf4_dequant import nf4_dequant
from memcompile.quant.nf4.nf4_linear import NF4LinearArgs, nf4_linear
from memcompile.quant.nf4.nf4_quant import NESTED_BLOCKSIZE, NF4Weight, nf4_quantize

log = logging.getLogger(__name__)

# The tensors holding ``NF4Weight.tensors()``, in that order. Their dtype is part of the format:
# ``.to(dtype)``/``.half()`` move them but never cast them.
_STATE = ("weight", "weight_absmax", "weight_quant_map", "weight_nested_absmax", "weight_nested_quant_map",
          "weight_nested_offset")
# The uint8 ones (the codes, and the absmax under double quantisation) are frozen parameters, so FSDP2
# shards them; the floating ones are buffers, which it replicates. FSDP2 never casts a non-floating
# parameter, while a MixedPrecisionPolicy with param_dtype=bf16 would round a floating one (the fp32
# absmax) in its all-gather and corrupt every weight. The floating state left as buffers is small:
# with double quantisation the fp32 nested absmax is 1/2048 of the codes' bytes; without it the fp32
# absmax is 1/8 and stays replicated.


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class NF4Linear(QuantizedLinear):
    """Frozen ``y = x W^T + b`` with ``W`` in NF4.

    State (names follow bitsandbytes' ``Linear4bit`` state dict, with ``_`` for ``.``):
    ``weight`` uint8 ``[ceil(out*in/2), 1]``, ``weight_absmax`` (fp32, or uint8 with double quant),
    ``weight_quant_map`` fp32 ``[16]``, and with double quant ``weight_nested_absmax`` fp32,
    ``weight_nested_quant_map`` fp32 ``[256]``, ``weight_nested_offset`` fp32 scalar. The uint8 ones
    are frozen parameters (``requires_grad=False``), the others buffers; the state dict is the same
    either way. ``bias`` stays dense, a frozen parameter.
    """

    def __init__(self, nf4: NF4Weight, bias: torch.Tensor | None = None):
        super().__init__()
        if len(nf4.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight, got shape {tuple(nf4.shape)}")
        self.out_features, self.in_features = nf4.shape
        self.blocksize = nf4.blocksize
        self.nested_blocksize = NESTED_BLOCKSIZE
        self.weight_dtype = nf4.dtype  # dtype before quantisation: what dequantize()/merging return
        for name, t in zip(_STATE, nf4.tensors()):
            if t is not None and t.dtype == torch.uint8:
                self.register_parameter(name, nn.Parameter(t, requires_grad=False))
            else:
                self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> "NF4Linear":
        return cls(nf4_quantize(linear.weight, blocksize, double_quant), linear.bias)

    @classmethod
    def from_bnb(cls, layer: nn.Module) -> "NF4Linear":
        """Take over the codes and state of a quantised ``bitsandbytes.nn.Linear4bit`` unchanged."""
        return cls(nf4_from_bnb(layer.weight, layer.weight.quant_state), layer.bias)

    @property
    def double_quant(self) -> bool:
        return self.weight_nested_absmax is not None

    def nf4_weight(self) -> NF4Weight:
        """The layer's buffers as an ``NF4Weight`` (no copy)."""
        return NF4Weight(packed=self.weight, absmax=self.weight_absmax, code=self.weight_quant_map,
                         shape=(self.out_features, self.in_features), dtype=self.weight_dtype, blocksize=self.blocksize,
                         nested_absmax=self.weight_nested_absmax, nested_code=self.weight_nested_quant_map,
                         nested_offset=self.weight_nested_offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(*NF4LinearArgs.of(x, self.nf4_weight(), self.bias))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight (``[out, in]``), in ``dtype`` or the dtype it had before quantisation."""
        w = self.nf4_weight()
        return nf4_dequant(*w.tensors(), *w.layout(), dtype or self.weight_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the quantised weight and its state (the bias not included)."""
        return self.nf4_weight().nbytes

    def describe(self) -> dict:
        return {"format": "nf4+dq" if self.double_quant else "nf4", "blocksize": self.blocksize}

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.blocksize}{dq}, weight_dtype={_dtype_name(self.weight_dtype)}")

    def _apply(self, fn, recurse=True):
        # A module-wide ``.to(torch.bfloat16)`` would round the fp32 absmax and code tables and corrupt
        # every weight; the quantisation state follows the device only.
        held = [(d, k, d[k]) for d in (self._parameters, self._buffers) for k in _STATE if d.get(k) is not None]
        for d, k, _ in held:
            d[k] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for d, k, t in held:
                device = fn(torch.empty(0, dtype=torch.uint8, device=t.device)).device
                if isinstance(t, nn.Parameter):
                    # In place, as nn.Module moves parameters: the object (and what refers to it) stays.
                    if t.device != device:
                        try:
                            t.data = t.data.to(device)
                        except RuntimeError:  # to or from meta: no shared tensor type, a new one as nn.Module does
                            t = nn.Parameter(t.data.to(device), requires_grad=False)
                    d[k] = t
                else:
                    d[k] = t.to(device)
        return self


def nf4_from_bnb(weight: torch.Tensor, quant_state) -> NF4Weight:
    """``NF4Weight`` from a bitsandbytes packed weight and its ``QuantState`` (no copy, no re-quantisation)."""
    if quant_state is None:
        raise ValueError("the bitsandbytes weight is not quantised yet (quant_state is None); move the layer to "
                         "its device first, as bitsandbytes quantises on .to()")
    if quant_state.quant_type != "nf4":
        raise ValueError(f"only NF4 is supported, the bitsandbytes layer uses {quant_state.quant_type!r}")
    if getattr(quant_state, "packing_format_for_cpu", False):
        return _from_bnb_cpu_layout(weight, quant_state)
    nested = quant_state.nested
    if nested and quant_state.state2.blocksize != NESTED_BLOCKSIZE:
        raise ValueError(f"double-quant block size {quant_state.state2.blocksize} is not supported "
                         f"(bitsandbytes uses {NESTED_BLOCKSIZE})")
    packed = weight.data.reshape(-1).view(torch.uint8).reshape(-1, 1)
    offset = quant_state.offset if nested else None
    if offset is not None and not torch.is_tensor(offset):
        offset = torch.tensor(offset, dtype=torch.float32, device=packed.device)
    return NF4Weight(
        packed=packed,
        absmax=quant_state.absmax,
        code=quant_state.code.to(packed.device, torch.float32),
        shape=tuple(quant_state.shape),
        dtype=quant_state.dtype,
        blocksize=quant_state.blocksize,
        nested_absmax=quant_state.state2.absmax if nested else None,
        nested_code=quant_state.state2.code if nested else None,
        nested_offset=None if offset is None else offset.reshape(()).float(),
    )


def _from_bnb_cpu_layout(weight: torch.Tensor, quant_state, block_n: int = 32) -> NF4Weight:
    """Undo bitsandbytes' CPU inference repacking (done by ``Linear4bit.forward`` in eval mode on CPUs
    with AVX512-BF16): codes tiled ``[N/32, K/2, 32, 2]`` with low nibbles first, absmax ``[K/bs, N]`` bf16.

    The absmax was rounded to bf16 by that repacking, and those are the values bitsandbytes computes
    with since; they are kept exactly (as fp32, without double quantisation) rather than re-quantised.
    """
    log.warning("bitsandbytes had repacked this weight for CPU inference, rounding its absmax to bf16; "
                "the rounded absmax is kept as is")
    n, k = quant_state.shape
    tiles = weight.data.view(torch.uint8).reshape(-1, block_n)
    codes = torch.cat([tiles & 0xF, tiles >> 4], dim=-1)  # the tile's 32 low nibbles, then its 32 high ones
    codes = codes.reshape(n // block_n, k // 2, block_n, 2).transpose(1, 2).reshape(-1)
    packed = ((codes[0::2] << 4) | codes[1::2]).reshape(-1, 1)
    absmax = quant_state.absmax.t().reshape(-1).float()
    return NF4Weight(packed=packed, absmax=absmax, code=quant_state.code.to(packed.device, torch.float32),
                     shape=(n, k), dtype=getattr(quant_state, "original_dtype", torch.float32),
                     blocksize=quant_state.blocksize)
