"""NF4 (QLoRA's 4-bit NormalFloat, bitsandbytes layout with optional double quantisation): the format
(``nf4_quant``), its ops (``nf4_dequant``, ``nf4_linear``), the layer (``module``), the graph-level swap
(``lora_pass``) and the scheme that plugs them into ``memcompile.quant`` (``scheme``)."""
from memcompile.quant.nf4.scheme import NF4

__all__ = ["NF4"]
