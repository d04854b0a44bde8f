"""NF4 quantisation of a frozen weight in the bitsandbytes layout (QLoRA's storage format).

This runs once per weight, when a model is prepared, never inside a training graph, so it is a plain
torch function rather than a ``memtrain::`` op. The result is bit-identical to
``bitsandbytes.functional.quantize_4bit(w, quant_type="nf4", blocksize=..., compress_statistics=...)``
as computed by bitsandbytes 0.50 on CPU:

* ``w`` is flattened row-major and cut into blocks of ``blocksize``; each block keeps its absmax (fp32);
* ``w / absmax`` goes to the nearest of the 16 NF4 values (bucketize on the midpoints);
* two codes per byte, the first element in the high nibble; ``packed`` has shape ``[ceil(n/2), 1]``;
* double quantisation: ``offset = mean(absmax)`` and ``absmax - offset`` is stored as 8 bits of the
  signed dynamic map in blocks of 256, each with an fp32 absmax (``nested_absmax``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# bitsandbytes' NF4 table (``get_4bit_type("nf4")``): quantiles of N(0, 1), exact zero at index 7.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
NESTED_BLOCKSIZE = 256
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# bitsandbytes' CPU 8-bit quantiser maps w/absmax through a table of this many bins (see below).
_LUT_SIZE = 65536


@dataclass
class NF4Weight:
    """A weight in NF4: the packed codes and everything needed to decode them.

    ``absmax`` is fp32 ``[nblocks]`` without double quantisation, else uint8 ``[nblocks]`` decoded as
    ``nested_code[absmax] * nested_absmax[i // 256] + nested_offset``.
    """

    packed: torch.Tensor  # uint8 [ceil(numel / 2), 1]
    absmax: torch.Tensor
    code: torch.Tensor  # fp32 [16]
    shape: tuple[int, ...]
    dtype: torch.dtype  # dtype of the weight before quantisation
    blocksize: int
    nested_absmax: torch.Tensor | None = None  # fp32 [ceil(nblocks / 256)]
    nested_code: torch.Tensor | None = None  # fp32 [256], the signed dynamic map
    nested_offset: torch.Tensor | None = None  # fp32 0-d

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """The six tensors, in the order every ``memtrain::nf4_*`` op takes them."""
        return (self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code, self.nested_offset)

    def layout(self) -> tuple[list[int], int, int]:
        """``(shape, blocksize, nested_blocksize)``: the ops' arguments that follow the tensors."""
        return list(self.shape), self.blocksize, NESTED_BLOCKSIZE

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map``: the 256-entry dynamic-exponent map used for the absmax.

    Built with the same fp32 operations in the same order, so the values are identical.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        shift = i + non_sign_bits - max_exponent_bits
        fraction_items = int(2 ** shift + 1 if signed else 2 ** (shift + 1) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:  # scaled by 10 ** 0, as bitsandbytes does with its last loop index
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += means.tolist()
        if signed:
            data += (-means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``flat`` zero-padded to whole blocks, as ``[nblocks, blocksize]`` (padding never raises an absmax)."""
    nblocks = -(-flat.numel() // blocksize)
    return torch.nn.functional.pad(flat, (0, nblocks * blocksize - flat.numel())).view(nblocks, blocksize)


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """8-bit blockwise quantisation, identical to bitsandbytes' CPU ``quantize_blockwise``.

    NOTE: bitsandbytes' CPU kernel does not search the nearest code directly: it maps
    ``clamp(x * (1 / absmax), -1, 1)`` to one of 65536 evenly spaced bins and reads the code of the bin
    from a table built from the code midpoints. Near a midpoint that can differ from the exact nearest
    code, so the same table is built here. Returns ``(codes uint8 [n], absmax fp32 [nblocks])``.
    """
    flat = x.reshape(-1).float()
    blocks = _blocks(flat, blocksize)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    normed = (blocks * (1.0 / safe)[:, None]).clamp(-1.0, 1.0)
    bins = ((normed + 1.0) * 0.5 * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32, device=flat.device)) / float(_LUT_SIZE - 1)
    code = code.to(flat.device, torch.float32)
    table = torch.searchsorted(0.5 * (code[:-1] + code[1:]), grid, side="left")
    q = table.index_select(0, bins.reshape(-1)).view(bins.shape).to(torch.uint8)
    q = torch.where((absmax == 0)[:, None], torch.zeros_like(q), q)  # bnb writes code 0 for an all-zero block
    return q.reshape(-1)[: flat.numel()], absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                              blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """fp32 ``code[q] * absmax[i // blocksize]`` (bitsandbytes' ``dequantize_blockwise``)."""
    n = q.numel()
    vals = _blocks(code.index_select(0, q.reshape(-1).long()), blocksize) * absmax[:, None]
    return vals.reshape(-1)[:n]


def nf4_quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantise ``w`` (fp32, fp16 or bf16, any shape) to NF4 in the bitsandbytes layout."""
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"NF4 quantisation needs a float32/float16/bfloat16 weight, got {w.dtype}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"NF4 blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    code = nf4_code(w.device)
    # Whole blocks are scaled by the reciprocal and the tail block by a division, as bitsandbytes does;
    # the two differ in the last bit, which can move a value across a midpoint.
    head = flat[:full].view(-1, blocksize)
    absmax = head.abs().amax(dim=1)
    scaled = (head * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, (flat[full:] / tail_max).clamp(-1, 1)])
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    out = NF4Weight(packed=packed, absmax=absmax, code=code, shape=tuple(w.shape), dtype=w.dtype, blocksize=blocksize)
    if double_quant:
        offset = absmax.mean()
        nested_code = dynamic_map().to(w.device)
        out.absmax, out.nested_absmax = quantize_blockwise_8bit(absmax - offset, nested_code)
        out.nested_code, out.nested_offset = nested_code, offset
    return out


def decode_absmax(nf4: NF4Weight) -> torch.Tensor:
    """The fp32 per-block absmax of ``nf4`` (decoding the double quantisation if present)."""
    if not nf4.double_quant:
        return nf4.absmax
    return dequantize_blockwise_8bit(nf4.absmax, nf4.nested_absmax, nf4.nested_code) + nf4.nested_offset
