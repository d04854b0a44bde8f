"""``memtrain::gaussian_sketch``: CompAct's projection ``P`` (n x r, entries N(0, 1/r)) from a seed.

``P`` is never stored: the forward and the backward each regenerate it from the same seed, so a saved
activation costs ``x P`` (r columns) plus one int64. On CUDA a Triton kernel draws Philox normals
(``tl.randn``), so no ``n x r`` tensor is read from memory; on CPU the reference uses a seeded
``torch.Generator``. The two paths draw different (equally distributed) numbers, which is fine
because one run never mixes devices between the forward and the backward of a layer.
"""
from __future__ import annotations

import math

import torch

from ._triton import HAS_TRITON, autotune, tl, triton, use_triton


def gaussian_sketch_ref(seed: int, n: int, r: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Reference: ``randn(n, r) / sqrt(r)`` from a generator seeded with ``seed``, cast to ``dtype``."""
    gen = torch.Generator(device=device).manual_seed(int(seed))
    p = torch.randn(n, r, generator=gen, device=device, dtype=torch.float32)
    return p.mul_(1.0 / math.sqrt(r)).to(dtype)


if HAS_TRITON:

    # Philox and a store per element: compute-light, so the block size and warps are all there is to tune.
    @autotune([triton.Config({"BLOCK": 1024}, num_warps=4), triton.Config({"BLOCK": 2048}, num_warps=8),
               triton.Config({"BLOCK": 4096}, num_warps=8)], triton.Config({"BLOCK": 1024}), key=["numel"])
    @triton.jit
    def _gaussian_sketch_kernel(
        out_ptr,  # [n, r] contiguous, output dtype
        seed,  # int
        numel,
        scale,  # 1 / sqrt(r), fp32
        BLOCK: tl.constexpr,
    ):
        # grid: (cdiv(n * r, BLOCK),); element i of the flattened P is the i-th Philox normal of `seed`
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        val = tl.randn(seed, offs) * scale
        tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=mask)


def gaussian_sketch_triton(seed: int, n: int, r: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(n, r, dtype=dtype, device=device)
    numel = n * r
    _gaussian_sketch_kernel[lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)](out, int(seed), numel,
                                                                              1.0 / math.sqrt(r))
    return out


@torch.library.custom_op("memtrain::gaussian_sketch", mutates_args=())
def gaussian_sketch(seed: torch.Tensor, n: int, r: int, dtype: torch.dtype, device: torch.device,
                    phase: int) -> torch.Tensor:
    """``P`` for ``seed`` (a 0-d int64 tensor). ``phase`` (0 forward, 1 backward) only keeps the two
    calls distinct, so graph CSE cannot merge them into one saved ``P``."""
    if torch.device(device).type == "meta":  # shapes only (the seed lives on the CPU, so no Meta dispatch)
        return torch.empty(n, r, dtype=dtype, device=device)
    s = int(seed.item())
    if use_triton(torch.device(device)):
        return gaussian_sketch_triton(s, n, r, dtype, torch.device(device))
    return gaussian_sketch_ref(s, n, r, dtype, torch.device(device))


@gaussian_sketch.register_fake
def _(seed, n, r, dtype, device, phase):
    return torch.empty(n, r, dtype=dtype, device=device)
