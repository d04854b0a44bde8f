"""``memtrain::fp8_quantize``: a saved activation stored as fp8 (e4m3fn) codes with one fp32 scale per row.

Rows are all dims but the last. For each row ``scale = max(absmax(row) / 448, tiny)`` (448: e4m3fn's
largest finite value; ``tiny = torch.finfo(torch.float32).tiny``) and ``q = (x / scale)`` rounded to the
nearest e4m3fn value, ties to even: ``torch``'s ``.to(torch.float8_e4m3fn)``. ``q`` has ``x``'s shape,
``scale`` is fp32 of shape ``x.shape[:-1] + (1,)``; ``memtrain::fp8_dequantize`` undoes it. The floor
comes after the division so the scale stays a normal fp32 number (nothing divides by a subnormal, which a
flush-to-zero path would turn into 0 / 0): an all-zero row gets ``scale = tiny`` and exact zeros back.

``q`` is a ``torch.uint8`` tensor of the e4m3fn bit patterns: ``q.view(torch.float8_e4m3fn)`` is the fp8
tensor, at no cost (``q.float()`` is not its value). An op taking a float8 tensor cannot pass
``torch.library.opcheck``'s ``test_schema`` in torch 2.13 (it compares the inputs before and after with
``torch.allclose``, which has no float8 kernel), so the pair passes the bits as bytes.

Saved bytes: ``rows * cols * 1 + rows * 4`` against ``rows * cols * 2`` for bf16/fp16 (about half) and
``rows * cols * 4`` for fp32.

Round-trip error, ``x_hat = fp8_dequantize(*fp8_quantize(x), dtype)``, per element with ``s`` its row's
scale:

* ``|x| >= 2^-6 s`` (e4m3 normals, 3 mantissa bits): ``|x_hat - x| <= 2^-4 |x|``. Round to nearest is half
  an ulp, at most 1/17 relative; the fp32 arithmetic and a final bf16/fp16 rounding of ``x_hat`` fit in
  the margin to 1/16.
* ``|x| < 2^-6 s`` (e4m3 subnormals, step ``2^-9 s``): ``|x_hat - x| <= 2^-10 s`` plus the final rounding
  of ``x_hat`` to ``dtype`` (at most ``2^-8 |x|`` for bf16, ``2^-10 |x|`` fp16, ``2^-22 |x|`` fp32).

Where ``x_hat`` falls below ``dtype``'s normal range (fp16 under 2^-14) add half of its subnormal step.

Non-finite input: a row holding an inf or NaN gets ``scale = inf``; its finite entries quantize to 0 and
its non-finite ones to NaN, so the whole row dequantizes to NaN (``0 * inf``); other rows are unaffected.

The Triton kernel (one program per block of rows, two passes over the columns: absmax, then quantize)
rounds to e4m3 in integer arithmetic, torch's rounding written out, rather than with
``.to(tl.float8e4nv)`` (Triton's e4m3fn): Triton 3.9's interpreter implements that cast with ties away
from zero, truncated subnormals, a mantissa carry that lands in the wrong exponent (0.0303 becomes
0.0156) and no NaN, so only the written-out rounding can be checked bit for bit under
``TRITON_INTERPRET=1``. The divisions are ``tl.div_rn`` (Triton's ``/`` is approximate on a GPU). The
kernel and the reference give the same bits.
"""
from __future__ import annotations

import math

import torch

from ._triton import HAS_TRITON, autotune, tl, triton, use_triton

E4M3_MAX = 448.0
TINY = torch.finfo(torch.float32).tiny
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHUNK_ELEMENTS = 1 << 24  # the reference's fp32 working set: 64 MiB


def _check(x: torch.Tensor) -> None:
    if x.dim() < 1 or x.dtype not in DTYPES:
        raise ValueError(f"memtrain::fp8_quantize: expected a float32/bfloat16/float16 tensor with ndim >= 1, "
                         f"got {x.dtype} of shape {tuple(x.shape)}")


def fp8_quantize_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``(q, scale)`` in chunks of rows, fp32 arithmetic, torch's e4m3fn cast (``q`` as its bytes)."""
    _check(x)
    n = x.shape[-1]
    x2 = x.reshape(math.prod(x.shape[:-1]), n)  # not -1: rows may be 0 wide
    q = torch.empty(x2.shape, dtype=torch.uint8, device=x.device)
    scale = torch.empty(x2.shape[0], 1, dtype=torch.float32, device=x.device)
    # A tensor divisor: CUDA divides by a Python scalar as a multiply by its reciprocal (one ulp off).
    e4m3_max = torch.tensor(E4M3_MAX, device=x.device)
    step = max(1, CHUNK_ELEMENTS // max(n, 1))
    for i in range(0, x2.shape[0], step):
        xs = x2[i:i + step].float()
        amax = xs.abs().amax(1, keepdim=True) if n else xs.new_zeros(xs.shape[0], 1)
        amax = torch.where(amax.isnan(), float("inf"), amax)  # a NaN row is flagged like an inf row
        s = (amax / e4m3_max).clamp_min(TINY)
        q[i:i + step] = (xs / s).to(torch.float8_e4m3fn).view(torch.uint8)
        scale[i:i + step] = s
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


if HAS_TRITON:
    # Memory-bound: one row per program for wide rows, several for narrow ones. The interpreter gets small
    # tiles so tests cover the column loop and the masks.
    @autotune([triton.Config({"BLOCK_M": 1, "BLOCK_N": 1024}, num_warps=4),
               triton.Config({"BLOCK_M": 1, "BLOCK_N": 2048}, num_warps=8),
               triton.Config({"BLOCK_M": 1, "BLOCK_N": 4096}, num_warps=8),
               triton.Config({"BLOCK_M": 4, "BLOCK_N": 512}, num_warps=4),
               triton.Config({"BLOCK_M": 16, "BLOCK_N": 128}, num_warps=4)],
              triton.Config({"BLOCK_M": 4, "BLOCK_N": 256}), key=["n_cols"])
    @triton.jit
    def _fp8_quantize_kernel(
        x_ptr,  # [n_rows, n_cols], row stride `stride`, unit column stride
        stride,
        q_ptr,  # uint8 [n_rows, n_cols] contiguous: e4m3fn bits
        scale_ptr,  # fp32 [n_rows]
        n_rows,
        n_cols,
        TINY: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # grid: (cdiv(n_rows, BLOCK_M),). Pass 1: row absmax (NaN counted as inf); pass 2: quantize.
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = rows < n_rows
        amax = tl.zeros((BLOCK_M,), tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (cols < n_cols)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            a = tl.abs(x)
            amax = tl.maximum(amax, tl.max(tl.where(a == a, a, float("inf")), 1))
        scale = tl.maximum(tl.div_rn(amax, 448.0), TINY)
        tl.store(scale_ptr + rows, scale, mask=row_mask)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (cols < n_cols)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            bits = tl.div_rn(x, scale[:, None]).to(tl.uint32, bitcast=True)
            sign = (bits >> 24) & 0x80
            mag = bits & 0x7FFFFFFF
            # e4m3 normals (>= 2^-6): rebias the exponent and round the mantissa to 3 bits, ties to even
            normal = (mag - (120 << 23) + 0x7FFFF + ((mag >> 20) & 1)) >> 20
            # subnormals: adding 2^14 leaves the value in fp32 units of 2^-9 (e4m3's subnormal step),
            # rounded to nearest even by the addition itself
            sub = (mag.to(tl.float32, bitcast=True) + 16384.0).to(tl.uint32, bitcast=True) - 0x46800000
            # >= 480 (and inf, NaN) is NaN, as torch's cast; after the scaling only NaN gets there
            code = tl.where(mag >= 0x43F00000, 0x7F, tl.where(mag < (121 << 23), sub, normal)) | sign
            tl.store(q_ptr + rows[:, None] * n_cols + cols[None, :], code.to(tl.uint8), mask=mask)


def fp8_quantize_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x)
    n = x.shape[-1]
    x2 = x.reshape(math.prod(x.shape[:-1]), n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = torch.empty(x2.shape, dtype=torch.uint8, device=x.device)
    scale = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    m = x2.shape[0]
    if m:
        _fp8_quantize_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](
            x2, x2.stride(0), q, scale, m, n, TINY=TINY)
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


@torch.library.custom_op("memtrain::fp8_quantize", mutates_args=())
def fp8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: ``x`` as e4m3fn codes (uint8, ``x``'s shape) and fp32 per-row scales
    (``x.shape[:-1] + (1,)``)."""
    if use_triton(x.device):
        return fp8_quantize_triton(x)
    return fp8_quantize_ref(x)


@fp8_quantize.register_fake
def _(x):
    _check(x)
    return (x.new_empty(x.shape, dtype=torch.uint8),
            x.new_empty((*x.shape[:-1], 1), dtype=torch.float32))
