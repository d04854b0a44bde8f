"""``memtrain::fp8_dequantize``: ``(e4m3fn(q) * scale).to(dtype)``, the inverse of ``memtrain::fp8_quantize``.

``q``: e4m3fn codes of any shape, as the uint8 bit patterns ``memtrain::fp8_quantize`` returns (why bytes
and not float8: that module's docstring); ``scale``: fp32 of shape ``q.shape[:-1] + (1,)``, one per row
(all dims but the last); ``dtype``: float32, bfloat16 or float16. The product is one fp32 multiply, then
one rounding to ``dtype``; the round trip's error bounds are in ``memcompile/kernels/fp8_quantize.py``.

The Triton kernel decodes the e4m3 bits and rounds fp32 to bf16 by hand: Triton 3.9's interpreter reads
the NaN code 0x7F as 480 and truncates fp32 to bf16, where torch (and the GPU) give NaN and round to
nearest even. Written out, the kernel gives the reference's bits on a GPU and under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import math

import torch

from ._triton import HAS_TRITON, autotune, tl, triton, use_triton

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
    if (q.dim() < 1 or q.dtype != torch.uint8 or scale.dtype != torch.float32
            or tuple(scale.shape) != (*q.shape[:-1], 1) or dtype not in DTYPES):
        raise ValueError(f"memtrain::fp8_dequantize: expected uint8 e4m3fn codes (ndim >= 1), float32 scales "
                         f"of shape q.shape[:-1] + (1,) and a float32/bfloat16/float16 dtype, got {q.dtype} "
                         f"{tuple(q.shape)}, {scale.dtype} {tuple(scale.shape)} and {dtype}")


def fp8_dequantize_ref(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reference: ``(q.view(torch.float8_e4m3fn).float() * scale).to(dtype)``."""
    _check(q, scale, dtype)
    return (q.view(torch.float8_e4m3fn).float() * scale).to(dtype)


if HAS_TRITON:
    # Elementwise and memory-bound: a 2-D grid of tiles, no loop.
    @autotune([triton.Config({"BLOCK_M": 1, "BLOCK_N": 1024}, num_warps=4),
               triton.Config({"BLOCK_M": 1, "BLOCK_N": 2048}, num_warps=8),
               triton.Config({"BLOCK_M": 4, "BLOCK_N": 1024}, num_warps=8),
               triton.Config({"BLOCK_M": 16, "BLOCK_N": 128}, num_warps=4)],
              triton.Config({"BLOCK_M": 4, "BLOCK_N": 256}), key=["n_cols"])
    @triton.jit
    def _fp8_dequantize_kernel(
        q_ptr,  # uint8 [n_rows, n_cols] contiguous: e4m3fn bits
        scale_ptr,  # fp32 [n_rows]
        out_ptr,  # [n_rows, n_cols] contiguous, output dtype
        n_rows,
        n_cols,
        OUT_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # grid: (cdiv(n_rows, BLOCK_M), cdiv(n_cols, BLOCK_N))
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        offs = rows[:, None] * n_cols + cols[None, :]
        b = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.uint32)
        mag = b & 0x7F
        # normals: exponent rebiased from 7 to 127, mantissa moved up; subnormals: mag * 2^-9; 0x7F: NaN
        val = tl.where(mag < 8, mag.to(tl.float32) * 0.001953125,
                       ((mag << 20) + (120 << 23)).to(tl.float32, bitcast=True))
        val = tl.where(mag == 0x7F, float("nan"), val)
        val = tl.where(b >= 0x80, -val, val)
        scale = tl.load(scale_ptr + rows, mask=rows < n_rows, other=1.0)
        out = val * scale[:, None]
        if OUT_BF16:
            # NOTE: round to nearest even by hand: the interpreter truncates fp32 -> bf16, the GPU rounds.
            bits = out.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            tl.store(out_ptr + offs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def fp8_dequantize_triton(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    _check(q, scale, dtype)
    n = q.shape[-1]
    q2 = q.reshape(math.prod(q.shape[:-1]), n).contiguous()  # not -1: rows may be 0 wide
    out = torch.empty(q2.shape, dtype=dtype, device=q.device)
    m = q2.shape[0]
    if m and n:
        _fp8_dequantize_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))](
            q2, scale.reshape(-1).contiguous(), out, m, n, OUT_BF16=dtype == torch.bfloat16)
    return out.reshape(q.shape)


@torch.library.custom_op("memtrain::fp8_dequantize", mutates_args=())
def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q``'s e4m3fn values times ``scale``, in ``dtype``: the activation ``memtrain::fp8_quantize`` stored."""
    if use_triton(q.device):
        return fp8_dequantize_triton(q, scale, dtype)
    return fp8_dequantize_ref(q, scale, dtype)


@fp8_dequantize.register_fake
def _(q, scale, dtype):
    _check(q, scale, dtype)
    return q.new_empty(q.shape, dtype=dtype)
