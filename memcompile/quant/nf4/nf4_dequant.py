"""``memtrain::nf4_dequant``: NF4 codes (bitsandbytes layout) back to a dense weight.

Element ``i`` of the row-major weight is ``code[nibble(i)] * absmax[i // blocksize]`` computed in fp32
and cast once to the output dtype, where ``nibble(i)`` is the high nibble of byte ``i // 2`` for even
``i`` and the low nibble for odd ``i``. With double quantisation the absmax is itself decoded first:
``absmax[j] = nested_code[absmax_u8[j]] * nested_absmax[j // nested_blocksize] + nested_offset``.
Both decodes happen in one pass, so the fp32 absmax never exists in memory.

On CUDA (and on CPU with ``TRITON_INTERPRET=1 MEMTRAIN_TRITON_ON_CPU=1``) the Triton kernel runs;
otherwise ``nf4_dequant_ref``. The op is opaque to Inductor (a ``torch.library`` op with a fake), because
``triton_op`` cannot be traced when the kernel runs in the interpreter.
"""
from __future__ import annotations

from typing import Optional

import torch

from memcompile._library import define_op
from memcompile.kernels._triton import HAS_TRITON, autotune, tl, triton, use_triton

if HAS_TRITON:

    # Memory-bound: a few block sizes and warp counts. The interpreter's cost is per program, so it gets
    # few large programs.
    @autotune([triton.Config({"BLOCK": 1024}, num_warps=4), triton.Config({"BLOCK": 2048}, num_warps=8),
               triton.Config({"BLOCK": 4096}, num_warps=8)], triton.Config({"BLOCK": 1 << 14}), key=["numel"])
    @triton.jit
    def _nf4_dequant_kernel(
        out_ptr,  # [numel], output dtype
        packed_ptr,  # uint8 [ceil(numel / 2)], two codes per byte, high nibble first
        absmax_ptr,  # fp32 [nblocks], or uint8 [nblocks] when NESTED
        code_ptr,  # fp32 [16]
        nested_absmax_ptr,  # fp32 [ceil(nblocks / NESTED_BLOCKSIZE)] (unused unless NESTED)
        nested_code_ptr,  # fp32 [256] (unused unless NESTED)
        nested_offset_ptr,  # fp32 [1] (unused unless NESTED)
        numel,
        BLOCKSIZE: tl.constexpr,
        NESTED: tl.constexpr,
        NESTED_BLOCKSIZE: tl.constexpr,
        OUT_BF16: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # grid: (cdiv(numel, BLOCK),); one program writes BLOCK consecutive output elements, so the
        # stores are contiguous; each byte is read by its two elements (the second read hits cache).
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
        shift = (1 - offs % 2) * 4
        q = (byte >> shift) & 0xF
        blk = offs // BLOCKSIZE
        if NESTED:
            qa = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
            scale2 = tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0)
            offset = tl.load(nested_offset_ptr)
            absmax = tl.load(nested_code_ptr + qa, mask=mask, other=0.0) * scale2 + offset
        else:
            absmax = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
        val = tl.load(code_ptr + q, mask=mask, other=0.0) * absmax
        if OUT_BF16:
            # NOTE: round to nearest even by hand: the interpreter truncates fp32 -> bf16, the GPU rounds;
            # this is the GPU's rounding, written out, so both give torch's ``.to(torch.bfloat16)``.
            bits = val.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            tl.store(out_ptr + offs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=mask)


def nf4_dequant_triton(packed, absmax, code, nested_absmax, nested_code, nested_offset, shape, blocksize,
                       nested_blocksize, dtype):
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    numel = out.numel()
    nested = nested_absmax is not None
    dummy = absmax  # stands in for the nested pointers when NESTED is off; never read
    _nf4_dequant_kernel[lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)](
        out, packed.reshape(-1).view(torch.uint8), absmax, code,
        nested_absmax if nested else dummy, nested_code if nested else dummy,
        nested_offset.reshape(1) if nested else dummy, numel,
        BLOCKSIZE=blocksize, NESTED=nested, NESTED_BLOCKSIZE=nested_blocksize,
        OUT_BF16=dtype == torch.bfloat16,
        # NOTE: without this the GPU compiler may fuse the nested decode's multiply-add into one FMA,
        # which rounds once instead of twice and no longer matches bitsandbytes bit for bit.
        enable_fp_fusion=False,
    )
    return out


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
               nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
               nested_offset: Optional[torch.Tensor], shape: list[int], blocksize: int,
               nested_blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """The op's body: a dense ``shape`` weight in ``dtype`` from NF4 codes and their (optionally
    double-quantised) absmax. Another op's body calls it without a second trip through the dispatcher."""
    args = (packed, absmax, code, nested_absmax, nested_code, nested_offset, shape, blocksize, nested_blocksize, dtype)
    return nf4_dequant_triton(*args) if use_triton(packed.device) else nf4_dequant_ref(*args)


def _fake(packed, absmax, code, nested_absmax, nested_code, nested_offset, shape, blocksize, nested_blocksize, dtype):
    return packed.new_empty(shape, dtype=dtype)


# Once per NF4 layer in every backward: registered without ``custom_op``'s per-call wrapper (``define_op``).
nf4_dequant = define_op(
    "nf4_dequant(Tensor packed, Tensor absmax, Tensor code, Tensor? nested_absmax, Tensor? nested_code, "
    "Tensor? nested_offset, SymInt[] shape, SymInt blocksize, SymInt nested_blocksize, ScalarType dtype) -> Tensor",
    dequantize, _fake)


def nf4_dequant_ref(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                    nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                    nested_offset: Optional[torch.Tensor], shape: list[int], blocksize: int,
                    nested_blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """Reference (and CPU path): the same arithmetic as bitsandbytes' ``dequantize_4bit``."""
    n = 1
    for s in shape:
        n *= s
    # index_select rather than advanced indexing: the latter is orders of magnitude slower on a busy CPU.
    if nested_absmax is not None:
        blk2 = torch.arange(absmax.numel(), device=absmax.device) // nested_blocksize
        absmax = nested_code.index_select(0, absmax.long()) * nested_absmax.index_select(0, blk2) + nested_offset
    b = packed.reshape(-1).view(torch.uint8)
    q = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:n]
    blk = torch.arange(n, device=q.device) // blocksize
    vals = code.index_select(0, q.long()) * absmax.float().index_select(0, blk)
    return vals.to(dtype).reshape(shape)
