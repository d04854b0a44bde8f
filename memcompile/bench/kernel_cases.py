"""Inputs and baselines of each kernel op for ``kernels`` mode: one function per op, keyed by op name.

Each returns ``Case``s: a size and the implementations to time, ours first, as zero-argument
callables. ``"torch"`` is the same op in plain torch (the op's ``_ref``); ``"bitsandbytes"`` is there
where bitsandbytes has the op. Sizes are the fine-tuning shapes of the anchors' models on CUDA and tiny
ones under Triton's interpreter on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class Case:
    size: str
    impls: dict[str, Callable[[], Any]]  # ours first, then "torch", then any other baseline
    differ: frozenset[str] = frozenset()  # impls whose output is not meant to match torch's


def _bnb_nf4(w: torch.Tensor):
    """bitsandbytes' NF4 (double quant, blocksize 64) of ``w``, or ``None`` where it does not run."""
    try:
        import bitsandbytes.functional as bnbf

        return bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    except Exception:  # no bitsandbytes build for this device: time the other implementations
        return None


def _nf4(w: torch.Tensor):
    from memcompile.quant.nf4.nf4_quant import nf4_quantize

    return nf4_quantize(w, blocksize=64, double_quant=True)


def gaussian_sketch(device: torch.device, tiny: bool) -> list[Case]:
    from memcompile.kernels import random_projection as rp

    dtype = torch.float32 if tiny else torch.bfloat16
    # CompAct at rank 0.25 of TinyLlama's MLP input (5632) and of Llama-7B's (11008).
    sizes = [(64, 16)] if tiny else [(5632, 1408), (11008, 2752)]
    return [Case(f"P {n}x{r} {str(dtype)[6:]}", {
        "triton": lambda n=n, r=r: rp.gaussian_sketch_triton(7, n, r, dtype, device),
        "torch": lambda n=n, r=r: rp.gaussian_sketch_ref(7, n, r, dtype, device),
    }, differ=frozenset({"triton"})) for n, r in sizes]  # Philox in the kernel, torch.Generator in the reference


def nf4_dequant(device: torch.device, tiny: bool) -> list[Case]:
    from memcompile.quant.nf4 import nf4_dequant as nd

    dtype = torch.float32 if tiny else torch.bfloat16
    # Frozen weights: TinyLlama's MLP (5632x2048) and Llama-7B's (11008x4096).
    shapes = [(64, 128)] if tiny else [(5632, 2048), (11008, 4096)]
    cases = []
    for shape in shapes:
        w = torch.randn(shape, device=device, dtype=dtype)
        q = _nf4(w)
        args = (*q.tensors(), *q.layout(), dtype)
        # The registered op too: what a compiled backward calls, through the dispatcher.
        impls = {"triton": lambda a=args: nd.nf4_dequant_triton(*a), "memtrain::nf4_dequant": lambda a=args: nd.nf4_dequant(*a),
                 "torch": lambda a=args: nd.nf4_dequant_ref(*a)}
        bnb = _bnb_nf4(w)
        if bnb is not None:
            import bitsandbytes.functional as bnbf

            impls["bitsandbytes"] = lambda q=bnb: bnbf.dequantize_4bit(q[0], q[1])
        cases.append(Case(f"W {shape[0]}x{shape[1]} {str(dtype)[6:]}", impls))
    return cases


def nf4_linear(device: torch.device, tiny: bool) -> list[Case]:
    """QLoRA's frozen matmul: ``x W^T`` with ``W`` in NF4, against a dense-weight matmul for scale."""
    import torch.nn.functional as F

    from memcompile.quant.nf4 import nf4_dequant as nd
    from memcompile.quant.nf4 import nf4_linear as nl

    dtype = torch.float32 if tiny else torch.bfloat16
    # One step of the anchors' TinyLlama run: 8192 tokens through the MLP up projection.
    shapes = [(16, 64, 128)] if tiny else [(8192, 5632, 2048)]
    cases = []
    for tokens, out_f, in_f in shapes:
        w = torch.randn(out_f, in_f, device=device, dtype=dtype)
        x = torch.randn(tokens, in_f, device=device, dtype=dtype)
        q = _nf4(w)
        impls = {
            "memtrain::nf4_linear": lambda: nl.nf4_linear(*nl.NF4LinearArgs.of(x, q)),
            "torch": lambda: F.linear(x, nd.nf4_dequant_ref(*q.tensors(), *q.layout(), dtype)),
        }
        bnb = _bnb_nf4(w)
        if bnb is not None:
            import bitsandbytes as bnb_mod

            impls["bitsandbytes"] = lambda q=bnb: bnb_mod.matmul_4bit(x, q[0].t(), quant_state=q[1])
        impls["dense F.linear"] = lambda: F.linear(x, w)  # the unquantised weight: what NF4 costs in time
        cases.append(Case(f"x {tokens}x{in_f} @ W {out_f}x{in_f} {str(dtype)[6:]}", impls,
                          differ=frozenset({"dense F.linear"})))
    return cases


def _activation(device: torch.device, tiny: bool):
    """Saved activations of the anchors' TinyLlama step: 8192 tokens of the hidden size (2048) and of the MLP
    (5632), bf16 (tiny: fp32, a width that is no multiple of a block)."""
    dtype = torch.float32 if tiny else torch.bfloat16
    shapes = [(16, 300)] if tiny else [(8192, 2048), (8192, 5632)]
    gen = torch.Generator(device=device).manual_seed(0)
    return [(torch.randn(shape, device=device, dtype=dtype, generator=gen), f"x {shape[0]}x{shape[1]} "
             f"{str(dtype)[6:]}") for shape in shapes]


def fp8_quantize(device: torch.device, tiny: bool) -> list[Case]:
    from memcompile.kernels import fp8_quantize as fq

    # The codes: equal codes need equal scales too.
    return [Case(size, {"triton": lambda x=x: fq.fp8_quantize_triton(x)[0],
                        "torch": lambda x=x: fq.fp8_quantize_ref(x)[0]}) for x, size in _activation(device, tiny)]


def fp8_dequantize(device: torch.device, tiny: bool) -> list[Case]:
    from memcompile.kernels import fp8_dequantize as fd
    from memcompile.kernels import fp8_quantize as fq

    cases = []
    for x, size in _activation(device, tiny):
        q, scale = fq.fp8_quantize_ref(x)
        cases.append(Case(size, {"triton": lambda q=q, s=scale, d=x.dtype: fd.fp8_dequantize_triton(q, s, d),
                                 "torch": lambda q=q, s=scale, d=x.dtype: fd.fp8_dequantize_ref(q, s, d)}))
    return cases


def _logits(device: torch.device, tiny: bool):
    """The anchors' TinyLlama loss: 8192 tokens over a 32k vocabulary, bf16 (tiny: fp32)."""
    dtype = torch.float32 if tiny else torch.bfloat16
    n, v, d = (16, 64, 32) if tiny else (8192, 32000, 2048)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, v, device=device, dtype=dtype, generator=gen)
    t = torch.randint(0, v, (n,), device=device, generator=gen)
    return x, t, d, f"{n}x{v} {str(dtype)[6:]}"


def cross_entropy(device: torch.device, tiny: bool) -> list[Case]:
    import torch.nn.functional as F

    from memcompile.kernels import cross_entropy as ce

    x, t, _, size = _logits(device, tiny)
    return [Case(f"logits {size}", {
        "triton": lambda: ce.cross_entropy_triton(x, t, -100, "mean")[0],
        "torch": lambda: ce.cross_entropy_ref(x, t, -100, "mean")[0],
        "F.cross_entropy(x.float())": lambda: F.cross_entropy(x.float(), t),  # what the model would run
    })]


def cross_entropy_backward(device: torch.device, tiny: bool) -> list[Case]:
    from memcompile.kernels import cross_entropy as ce

    x, t, _, size = _logits(device, tiny)
    lse = torch.logsumexp(x.float(), 1)
    g = torch.ones((), device=device)
    return [Case(f"logits {size}", {
        "triton": lambda: ce.cross_entropy_backward_triton(g, x, t, lse, -100, "mean"),
        "torch": lambda: ce.cross_entropy_backward_ref(g, x, t, lse, -100, "mean"),
    })]


def linear_cross_entropy(device: torch.device, tiny: bool) -> list[Case]:
    """Forward and backward of the output projection and the loss: the fused op against torch's."""
    from memcompile.kernels import linear_cross_entropy as lce

    x, t, d, size = _logits(device, tiny)
    n, v = x.shape
    h = torch.randn(n, d, device=device, dtype=x.dtype, requires_grad=True)
    w = torch.randn(v, d, device=device, dtype=x.dtype) / d**0.5

    def step(fn):
        h.grad = None
        fn(h, w, t)[0].backward()
        return h.grad

    return [Case(f"h {n}x{d} @ W {v}x{d}, fwd+bwd", {
        "memtrain::linear_cross_entropy_forward": lambda: step(lce.linear_cross_entropy),
        "torch": lambda: step(lce.linear_cross_entropy_ref),
    })]


CASES: dict[str, Callable[[torch.device, bool], list[Case]]] = {
    "cross_entropy": cross_entropy,
    "cross_entropy_backward": cross_entropy_backward,
    "linear_cross_entropy": linear_cross_entropy,
    "gaussian_sketch": gaussian_sketch,
    "fp8_quantize": fp8_quantize,
    "fp8_dequantize": fp8_dequantize,
    "nf4_dequant": nf4_dequant,
    "nf4_linear": nf4_linear,
}
