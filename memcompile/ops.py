"""Every ``memtrain::`` op; importing this module registers them all.

Naming: the op ``memtrain::<name>`` is the Python function ``<name>`` of the file that defines it, next
to its fake (meta) function, its autograd formula and its torch reference. An op that returns what its
backward needs besides its result is ``<name>_forward`` (paired with ``<name>_backward`` where that is
an op too), and ``<name>``, a plain function, returns the result alone.

=================================  ==================================================
op                                 defined in
=================================  ==================================================
``cross_entropy_forward``          ``memcompile/kernels/cross_entropy.py``
``cross_entropy_backward``         ``memcompile/kernels/cross_entropy.py``
``linear_cross_entropy_forward``   ``memcompile/kernels/linear_cross_entropy.py``
``gaussian_sketch``                ``memcompile/kernels/random_projection.py``
``offload``                        ``memcompile/kernels/host_offload.py``
``offload_wait``                   ``memcompile/kernels/host_offload.py``
``reload``                         ``memcompile/kernels/host_offload.py``
``reload_wait``                    ``memcompile/kernels/host_offload.py``
``fp8_quantize``                   ``memcompile/kernels/fp8_quantize.py``
``fp8_dequantize``                 ``memcompile/kernels/fp8_dequantize.py``
``nf4_dequant``                    ``memcompile/quant/nf4/nf4_dequant.py``
``nf4_linear``                     ``memcompile/quant/nf4/nf4_linear.py``
``velora_vector``                  ``memcompile/passes/compression/velora.py``
``compact_seed``                   ``memcompile/passes/compression/compact.py``
=================================  ==================================================

Graph code refers to an op as ``memtrain.<name>.default``, with ``memtrain`` from here, so the op is
registered wherever it is matched or inserted.
"""
import torch

from memcompile.kernels.cross_entropy import cross_entropy_backward, cross_entropy_forward
from memcompile.kernels.fp8_dequantize import fp8_dequantize
from memcompile.kernels.fp8_quantize import fp8_quantize
from memcompile.kernels.host_offload import offload, offload_wait, reload, reload_wait
from memcompile.kernels.linear_cross_entropy import linear_cross_entropy_forward
from memcompile.kernels.random_projection import gaussian_sketch
from memcompile.passes.compression.compact import compact_seed
from memcompile.passes.compression.velora import velora_vector
from memcompile.quant.nf4.nf4_dequant import nf4_dequant
from memcompile.quant.nf4.nf4_linear import nf4_linear

memtrain = torch.ops.memtrain

__all__ = [
    "compact_seed",
    "cross_entropy_backward",
    "cross_entropy_forward",
    "fp8_dequantize",
    "fp8_quantize",
    "gaussian_sketch",
    "linear_cross_entropy_forward",
    "memtrain",
    "nf4_dequant",
    "nf4_linear",
    "offload",
    "offload_wait",
    "reload",
    "reload_wait",
    "velora_vector",
]
