"""The NF4 scheme: what ``memcompile.quant`` needs of NF4, in terms of the folder's format, ops and layer."""
from __future__ import annotations

import sys

import torch
import torch.nn as nn

from memcompile.quant.base import QuantCall, QuantScheme, register
from memcompile.quant.nf4.module import NF4Linear
from memcompile.quant.nf4.nf4_dequant import nf4_dequant
from memcompile.quant.nf4.nf4_linear import NF4LinearArgs
from memcompile.quant.nf4.nf4_quant import NF4Weight, nf4_quantize


@register
class NF4(QuantScheme):
    name = "nf4"
    layer = NF4Linear

    def quantize(self, weight: torch.Tensor, cfg) -> NF4Weight:
        return nf4_quantize(weight, cfg.blocksize, cfg.double_quant)

    def dequantize(self, state: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
        return nf4_dequant(*state.tensors(), *state.layout(), dtype or state.dtype)

    def from_linear(self, linear: nn.Linear, cfg) -> NF4Linear:
        return NF4Linear.from_linear(linear, cfg.blocksize, cfg.double_quant)

    def adopt(self, module: nn.Module) -> NF4Linear | None:
        # Looked up, not imported: a model cannot hold bitsandbytes layers unless bitsandbytes was imported.
        linear4bit = getattr(sys.modules.get("bitsandbytes.nn"), "Linear4bit", None)
        if linear4bit is not None and isinstance(module, linear4bit):
            return NF4Linear.from_bnb(module)
        return None

    @property
    def op(self):
        return torch.ops.memtrain.nf4_linear.default

    def call(self, args) -> QuantCall:
        a = NF4LinearArgs(*args)
        return QuantCall(a.x, a.weight_tensors, a.shape)
