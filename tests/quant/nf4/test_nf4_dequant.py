"""``memtrain::nf4_dequant``: the torch reference against bitsandbytes, the Triton kernel against the
reference (interpreter on CPU, native on CUDA), and the op's registration."""
import pytest
import torch

bnbf = pytest.importorskip("bitsandbytes.functional")

from memcompile.kernels._triton import HAS_TRITON  # noqa: E402
from memcompile.quant.nf4.nf4_dequant import nf4_dequant, nf4_dequant_ref, nf4_dequant_triton  # noqa: E402
from memcompile.quant.nf4.nf4_linear import NF4LinearArgs  # noqa: E402
from memcompile.quant.nf4.nf4_quant import nf4_quantize  # noqa: E402

SHAPES = [(33, 77), (65, 31), (7, 3), (130, 258)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _args(w, dtype, double_quant=True, blocksize=64):
    q = nf4_quantize(w, blocksize=blocksize, double_quant=double_quant)
    return (*q.tensors(), *q.layout(), dtype)


def _bnb_dequant(w, dtype, double_quant):
    packed, st = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=double_quant)
    st.dtype = dtype
    # bitsandbytes runs its torch fallback (odd last dimension) through torch.compile; eager gives the
    # same numbers without a compile per shape.
    with torch.compiler.set_stance("force_eager"):
        return bnbf.dequantize_4bit(packed, st)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_bit_exact_with_bitsandbytes(shape, double_quant, dtype):
    torch.manual_seed(shape[0])
    w = torch.randn(shape) * 0.02
    out = nf4_dequant_ref(*_args(w, dtype, double_quant))
    assert out.dtype == dtype and out.shape == shape
    assert torch.equal(out, _bnb_dequant(w, dtype, double_quant))


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_equals_reference(shape, double_quant, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter (conftest)
    torch.manual_seed(shape[1])
    w = torch.randn(shape, device=device) * 0.02
    args = _args(w, dtype, double_quant)
    assert torch.equal(nf4_dequant_triton(*args), nf4_dequant_ref(*args))


@pytest.mark.gpu
def test_triton_on_cuda_equals_bitsandbytes():
    w = torch.randn(4096 + 7, 129) * 0.02
    packed, st = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    args = _args(w, torch.bfloat16)
    st.dtype = torch.bfloat16
    # bitsandbytes' CUDA kernel: its CPU dequantisation compiles with Inductor on first use (about a
    # minute on a fresh machine, measured on the first GPU run)
    st.to("cuda")
    ref = bnbf.dequantize_4bit(packed.cuda(), st)
    cuda_args = [a.cuda() if torch.is_tensor(a) else a for a in args]
    assert torch.equal(nf4_dequant(*cuda_args), ref)


def test_dequant_other_blocksize_and_opcheck():
    w = torch.randn(20, 50)
    args = _args(w, torch.float32, blocksize=128)
    packed, st = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=128, compress_statistics=True)
    assert torch.equal(nf4_dequant(*args), bnbf.dequantize_4bit(packed, st))
    torch.library.opcheck(nf4_dequant, args)
    torch.library.opcheck(nf4_dequant, _args(w, torch.bfloat16, double_quant=False))


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_op_launches_triton_inside_compiled_graph(monkeypatch):
    """Through the op, under torch.compile: fake tracing must not launch the (interpreted) kernel, and
    the forward and the backward's re-dequantisation both run it."""
    from memcompile.quant.nf4 import nf4_dequant as module
    from memcompile.quant.nf4.nf4_linear import nf4_linear

    calls = []
    launch = module.nf4_dequant_triton

    def counted_launch(*a):
        calls.append(a[-1])
        return launch(*a)

    monkeypatch.setattr(module, "nf4_dequant_triton", counted_launch)
    monkeypatch.setenv("MEMTRAIN_TRITON_ON_CPU", "1")
    if not module.use_triton(torch.empty(0).device) and not torch.cuda.is_available():
        pytest.skip("Triton runs on CPU only under TRITON_INTERPRET=1")
    w = torch.randn(33, 77) * 0.02
    q = nf4_quantize(w, blocksize=64, double_quant=True)
    args = (*q.tensors(), *q.layout(), torch.float32)
    x = torch.randn(4, 77, requires_grad=True)
    fn = torch.compile(lambda x: nf4_linear(*NF4LinearArgs.of(x, q)), backend="aot_eager", fullgraph=True)
    y = fn(x)
    y.sum().backward()
    dense = nf4_dequant_ref(*args)
    assert torch.equal(y, x.detach() @ dense.t()) and torch.equal(x.grad, torch.ones(4, 33) @ dense)
    assert len(calls) == 2
