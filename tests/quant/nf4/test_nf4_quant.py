"""NF4 quantisation against bitsandbytes: the packed codes and every piece of state, bit for bit."""
import pytest
import torch

bnbf = pytest.importorskip("bitsandbytes.functional")

from memcompile.quant.nf4.nf4_quant import NF4_CODE, decode_absmax, dynamic_map, nf4_quantize, quantize_blockwise_8bit  # noqa: E402

# Odd on purpose: no dimension a multiple of the block size, odd element counts, a single element.
SHAPES = [(33, 77), (65, 31), (7, 3), (1, 1), (130, 257)]


def test_tables_match_bitsandbytes():
    assert torch.equal(dynamic_map(), bnbf.create_dynamic_map())
    assert torch.equal(torch.tensor(NF4_CODE), bnbf.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_bit_exact(shape, double_quant, dtype):
    torch.manual_seed(sum(shape))
    w = (torch.randn(shape) * 0.02).to(dtype)
    packed, st = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=double_quant)
    ours = nf4_quantize(w, blocksize=64, double_quant=double_quant)
    assert ours.packed.shape == packed.shape == ((w.numel() + 1) // 2, 1)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax, st.absmax)
    assert ours.double_quant == st.nested
    if double_quant:
        assert ours.absmax.dtype == torch.uint8
        assert torch.equal(ours.nested_absmax, st.state2.absmax)
        assert torch.equal(ours.nested_code, st.state2.code)
        assert torch.equal(ours.nested_offset, st.offset)
        assert torch.equal(decode_absmax(ours), bnbf.dequantize_blockwise(st.absmax, st.state2) + st.offset)


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_quantize_other_blocksizes(blocksize):
    w = torch.randn(40, 100)
    packed, st = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=blocksize, compress_statistics=True)
    ours = nf4_quantize(w, blocksize=blocksize)
    assert torch.equal(ours.packed, packed) and torch.equal(ours.absmax, st.absmax)


def test_absmax_8bit_near_code_midpoints():
    """bitsandbytes' CPU 8-bit quantiser goes through a 65536-bin table; values placed right at the
    table's bin edges where the code changes are where a nearest-code search would disagree."""
    code = dynamic_map()
    mid = 0.5 * (code[:-1] + code[1:])
    g = torch.Generator().manual_seed(0)
    x = (mid.repeat(8) + torch.randn(8 * 255, generator=g) * 3e-7).clamp(-1, 1)
    x = torch.cat([torch.ones(1), x])  # absmax 1: the values are used as they are
    q_ref, absmax_ref = torch.ops.bitsandbytes.quantize_blockwise.default(x, code, 256)
    q, absmax = quantize_blockwise_8bit(x, code, 256)
    assert torch.equal(absmax, absmax_ref)
    assert torch.equal(q, q_ref)


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        nf4_quantize(torch.zeros(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="blocksize"):
        nf4_quantize(torch.zeros(4, 4), blocksize=48)
