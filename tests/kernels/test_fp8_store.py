"""``memtrain::fp8_quantize`` / ``memtrain::fp8_dequantize`` against the format written out from its
definition here: the e4m3fn grid from its bits, round to nearest (ties to the even code), per-row scale
``max(absmax / 448, tiny)``, fp32 quotients and products computed exactly in fp64 and rounded once."""
import pytest
import torch

from memcompile.kernels import fp8_dequantize as fd
from memcompile.kernels import fp8_quantize as fq
from memcompile.kernels._triton import HAS_TRITON

TINY = torch.finfo(torch.float32).tiny
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# CPU: the Triton interpreter (conftest sets TRITON_INTERPRET=1 without CUDA); CUDA: natively.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")


def _grid() -> torch.Tensor:
    """The value of each code 0..126 (0x7F is NaN): ``m 2^-9`` for exponent 0, else ``(1 + m/8) 2^(e-7)``."""
    vals = []
    for c in range(127):
        e, m = c >> 3, c & 7
        vals.append(m * 2.0 ** -9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return torch.tensor(vals, dtype=torch.float64)


GRID = _grid()


def nearest_e4m3(v: torch.Tensor) -> torch.Tensor:
    """uint8 codes of the fp32 values ``v``: nearest grid value, ties to the even code, NaN as 0x7F."""
    a = v.double().abs().flatten()
    hi = torch.searchsorted(GRID, a).clamp(1, 126)
    lo = hi - 1
    d_lo, d_hi = a - GRID[lo], GRID[hi] - a
    code = torch.where((d_lo < d_hi) | ((d_lo == d_hi) & (lo % 2 == 0)), lo, hi)
    code = torch.where(a >= GRID[126], 126, code)  # 448 (1 + 2^-23) still rounds to 448
    code = torch.where(a.isnan(), 0x7F, code)
    code = code | torch.where(torch.signbit(v.flatten()), 0x80, 0)
    return code.to(torch.uint8).reshape(v.shape)


def definition(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` of ``x`` from the format's definition (finite ``x``)."""
    x64 = x.double()
    amax = x64.abs().amax(-1, keepdim=True)
    scale = (amax / 448).float().clamp_min(TINY)  # fp64 then one rounding: the correctly rounded fp32 quotient
    return nearest_e4m3((x64 / scale.double()).float()), scale


def decode(codes: torch.Tensor) -> torch.Tensor:
    """fp64 values of uint8 codes."""
    v = GRID[(codes & 0x7F).long().clamp(max=126)]
    v = torch.where((codes & 0x7F) == 0x7F, float("nan"), v)
    return torch.where(codes >= 0x80, -v, v)


def _quantize(path: str, x: torch.Tensor):
    return fq.fp8_quantize_triton(x) if path == "triton" else torch.ops.memtrain.fp8_quantize(x)


def _dequantize(path: str, q, scale, dtype):
    return fd.fp8_dequantize_triton(q, scale, dtype) if path == "triton" else torch.ops.memtrain.fp8_dequantize(
        q, scale, dtype)


PATHS = ["op", pytest.param("triton", marks=needs_triton)]


def _inputs(dtype: torch.dtype, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # Rows spanning 16 decades: most entries land in e4m3's subnormal range or flush to zero.
    wide = torch.randn(16, 300, generator=g) * torch.logspace(-12, 4, 300)
    wide[2] = 0
    wide[5, ::3] = 0
    xs = {
        "1d": torch.randn(1000, generator=g),
        "2d": wide,
        "3d": torch.randn(2, 5, 130, generator=g) * 30,
        "transposed": torch.randn(300, 24, generator=g).t(),  # last-dim stride 24
        "strided_3d": (torch.randn(3, 40, 66, generator=g) * 1e-3).permute(1, 0, 2)[:, :, ::2],
    }
    return {k: v.to(dtype).to(device) for k, v in xs.items()}


def test_reference_rounding_is_torch_cast():
    """The grid here and torch's e4m3fn cast agree: every value, every midpoint and its neighbours."""
    mids = (GRID[:-1] + GRID[1:]) / 2
    near = torch.cat([mids, mids.float().nextafter(torch.tensor(0.0)).double(),
                      mids.float().nextafter(torch.tensor(500.0)).double()])
    v = torch.cat([GRID, near, torch.rand(20000, dtype=torch.float64) * 448,
                   torch.rand(5000, dtype=torch.float64) * 2 ** -6]).float()
    v = torch.cat([v, -v])
    assert torch.equal(nearest_e4m3(v), v.to(torch.float8_e4m3fn).view(torch.uint8))
    codes = torch.arange(256, dtype=torch.uint8)
    torch.testing.assert_close(decode(codes), codes.view(torch.float8_e4m3fn).double(), rtol=0, atol=0,
                               equal_nan=True)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_is_the_definition(path, dtype):
    """Codes and scales bit for bit, for every shape and layout; the reference and the kernel alike."""
    device = DEVICE if path == "triton" else "cpu"
    for name, x in _inputs(dtype, device).items():
        q, scale = _quantize(path, x)
        codes, want_scale = definition(x.cpu())
        assert q.dtype == torch.uint8 and q.shape == x.shape and q.element_size() == 1, name
        assert scale.dtype == torch.float32 and scale.shape == (*x.shape[:-1], 1), name
        assert torch.equal(scale.cpu(), want_scale), name
        assert torch.equal(q.cpu(), codes), name


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 448 * 146.3 is inf in fp16, as torch
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_is_the_definition(path, dtype):
    """Every code times scales from tiny to huge, plus random codes: one fp32 product, one rounding."""
    device = DEVICE if path == "triton" else "cpu"
    g = torch.Generator().manual_seed(1)
    codes = torch.cat([torch.arange(256, dtype=torch.uint8).repeat(6, 1),
                       torch.randint(0, 256, (6, 256), generator=g, dtype=torch.uint8)], 1)
    scale = torch.tensor([TINY, 1e-20, 3e-3, 1.0, 0.37, 146.2857], dtype=torch.float32).reshape(6, 1)
    want = (decode(codes) * scale.double()).float().to(dtype)  # fp64 product is exact: 4 x 24 bits
    out = _dequantize(path, codes.to(device), scale.to(device), dtype)
    assert out.dtype == dtype and out.shape == codes.shape
    torch.testing.assert_close(out.cpu(), want, rtol=0, atol=0, equal_nan=True)


def _bound_holds(x: torch.Tensor, x_hat: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
    """The module docstring's bounds: 2^-4 |x| on e4m3 normals, 2^-10 scale plus ``dtype``'s last rounding
    on its subnormals, plus half of ``dtype``'s subnormal step where ``x_hat`` is that small."""
    x64, err, s = x.double(), (x_hat.double() - x.double()).abs(), scale.double()
    normal = x64.abs() >= 2 ** -6 * s
    last = {torch.float32: 2 ** -22, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -10}[dtype] * x64.abs()
    half_sub = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps / 2
    assert (err <= 2 ** -4 * x64.abs() + half_sub)[normal].all()
    assert (err <= 2 ** -10 * s + last + half_sub)[~normal].all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_error_bound(path, dtype, out_dtype):
    device = DEVICE if path == "triton" else "cpu"
    seen_normal = seen_sub = 0
    for name, x in _inputs(dtype, device).items():
        q, scale = _quantize(path, x)
        x_hat = _dequantize(path, q, scale, out_dtype)
        assert x_hat.shape == x.shape and x_hat.dtype == out_dtype, name
        x, x_hat, scale = x.cpu(), x_hat.cpu(), scale.cpu()
        _bound_holds(x, x_hat, scale, out_dtype)
        normal = x.double().abs() >= 2 ** -6 * scale.double()
        seen_normal += int(normal.sum())
        seen_sub += int(((~normal) & (x != 0)).sum())
    assert seen_normal > 1000 and seen_sub > 1000  # both regimes are exercised


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_rows_come_back_exactly(path, dtype):
    device = DEVICE if path == "triton" else "cpu"
    x = torch.randn(4, 37).to(dtype).to(device)
    x[1] = 0
    x[3] = -0.0
    q, scale = _quantize(path, x)
    assert scale[1].item() == TINY and scale[3].item() == TINY
    x_hat = _dequantize(path, q, scale, dtype)
    assert (x_hat[1] == 0).all() and (x_hat[3] == 0).all()
    assert torch.equal(torch.signbit(x_hat[[1, 3]]), torch.signbit(x[[1, 3]]))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_representable_values_round_trip_exactly(path, dtype):
    """``x = scale * g`` for every finite grid value ``g`` (both signs) comes back bit for bit, with that
    ``scale``, when ``scale`` has few enough significant bits that ``448 scale`` and ``g scale`` are exact."""
    device = DEVICE if path == "triton" else "cpu"
    g = torch.cat([GRID, -GRID])
    # 4 significant bits: g (4 bits) * scale fits bf16's 8; powers of two and not
    scales = torch.tensor([1.0, 2.0 ** -20, 2.0 ** 5, 0.8125, 13.0, 0.01171875], dtype=torch.float64)
    if dtype == torch.float16:
        scales = scales[scales >= 2 ** -6]  # keeps g * scale clear of fp16's subnormals and overflow
    x = (scales[:, None] * g[None, :]).to(dtype)
    assert torch.equal(x.double(), scales[:, None] * g[None, :])  # exactly representable
    q, scale = _quantize(path, x.to(device))
    assert torch.equal(scale.cpu().double(), scales[:, None])
    assert torch.equal(q.cpu(), nearest_e4m3(g.float()).expand_as(x))
    assert torch.equal(_dequantize(path, q, scale, dtype).cpu(), x)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf / inf
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_row_dequantizes_to_nan(path, dtype):
    """A row with inf, -inf or NaN: ``scale = inf``, finite entries 0, non-finite ones NaN, the whole row
    NaN after the round trip; the other rows as if quantized alone."""
    device = DEVICE if path == "triton" else "cpu"
    x = (torch.randn(5, 70) * 3).to(dtype)
    x[1, 4], x[2, 69], x[3, 0] = float("inf"), -float("inf"), float("nan")
    q, scale = _quantize(path, x.to(device))
    q, scale = q.cpu(), scale.cpu()
    assert torch.isinf(scale[1:4]).all() and (scale[1:4] > 0).all()
    finite = torch.isfinite(x[1:4])
    v = q.view(torch.float8_e4m3fn).float()
    assert (v[1:4][finite] == 0).all() and v[1:4][~finite].isnan().all()
    x_hat = _dequantize(path, q.to(device), scale.to(device), dtype).cpu()
    assert x_hat[1:4].isnan().all()
    codes, want_scale = definition(x[[0, 4]])
    assert torch.equal(scale[[0, 4]], want_scale) and torch.equal(q[[0, 4]], codes)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(3, 0), (0, 5), (2, 0, 4)])
def test_empty_tensors(path, shape):
    """No rows or 0-wide rows: the shapes still hold; a 0-wide row is a zero row (scale ``tiny``)."""
    device = DEVICE if path == "triton" else "cpu"
    x = torch.empty(shape, device=device)
    q, scale = _quantize(path, x)
    assert q.shape == x.shape and scale.shape == (*shape[:-1], 1) and (scale == TINY).all()
    assert _dequantize(path, q, scale, torch.bfloat16).shape == x.shape


def test_saved_bytes_are_about_half_of_bf16():
    """``rows * cols * 1 + rows * 4`` bytes for a (4096, 2048) bf16 activation of ``rows * cols * 2``."""
    rows, cols = 4096, 2048
    x = torch.randn(rows, cols, dtype=torch.bfloat16)
    q, scale = torch.ops.memtrain.fp8_quantize(x)
    assert q.element_size() == 1 and scale.element_size() == 4
    saved = q.numel() * q.element_size() + scale.numel() * scale.element_size()
    assert saved == rows * cols + rows * 4
    assert saved / (x.numel() * x.element_size()) == pytest.approx(0.5 + 2 / cols)  # 0.50098


def test_op_routes_to_triton_only_when_asked(monkeypatch):
    x = torch.randn(6, 50)
    calls = []
    monkeypatch.setattr(fq, "fp8_quantize_triton", lambda t: calls.append(1) or fq.fp8_quantize_ref(t))
    monkeypatch.setattr(fd, "fp8_dequantize_triton", lambda *a: calls.append(2) or fd.fp8_dequantize_ref(*a))
    q, scale = torch.ops.memtrain.fp8_quantize(x)
    torch.ops.memtrain.fp8_dequantize(q, scale, torch.float32)
    assert calls == []
    monkeypatch.setenv("MEMTRAIN_TRITON_ON_CPU", "1")
    if fq.use_triton(torch.device("cpu")):
        q, scale = torch.ops.memtrain.fp8_quantize(x)
        torch.ops.memtrain.fp8_dequantize(q, scale, torch.float32)
        assert calls == [1, 2]


def test_rejects_what_it_does_not_store():
    with pytest.raises(ValueError, match="ndim >= 1"):
        torch.ops.memtrain.fp8_quantize(torch.tensor(1.0))
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        torch.ops.memtrain.fp8_quantize(torch.ones(3, 4, dtype=torch.float64))
    q, scale = torch.ops.memtrain.fp8_quantize(torch.ones(3, 4))
    with pytest.raises(ValueError, match="q.shape"):
        torch.ops.memtrain.fp8_dequantize(q, scale.reshape(3), torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        torch.ops.memtrain.fp8_dequantize(q, scale, torch.int32)


@pytest.mark.parametrize("shape, dtype", [((8, 33), torch.bfloat16), ((2, 3, 17), torch.float32),
                                          ((40,), torch.float16)])
def test_opcheck(shape, dtype):
    x = torch.randn(shape).to(dtype)
    torch.library.opcheck(torch.ops.memtrain.fp8_quantize.default, (x,),
                          test_utils=("test_schema", "test_faketensor"))
    q, scale = torch.ops.memtrain.fp8_quantize(x)
    torch.library.opcheck(torch.ops.memtrain.fp8_dequantize.default, (q, scale, dtype),
                          test_utils=("test_schema", "test_faketensor"))


def test_ops_trace_into_a_compiled_graph():
    """What the planner will do: quantize in one place, dequantize later, under fake tensors."""
    def f(x):
        q, scale = torch.ops.memtrain.fp8_quantize(x)
        return torch.ops.memtrain.fp8_dequantize(q, scale, x.dtype) * 2

    x = torch.randn(12, 40, dtype=torch.bfloat16)
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(out, f(x))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8192, 2048), (8192 + 5, 3001), (7, 4097), (4, 33, 1000)])
def test_cuda_kernels_equal_reference(shape):
    """Training sizes and widths that are no multiple of any block: the same bits as the torch reference
    run on the same GPU, and as the definition."""
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * torch.rand(shape[-1], device="cuda") * 8
    q, scale = fq.fp8_quantize_triton(x)
    q_ref, scale_ref = fq.fp8_quantize_ref(x)
    assert torch.equal(scale, scale_ref) and torch.equal(q, q_ref)
    codes, want_scale = definition(x.cpu())
    assert torch.equal(scale.cpu(), want_scale) and torch.equal(q.cpu(), codes)
    for dtype in DTYPES:
        assert torch.equal(fd.fp8_dequantize_triton(q, scale, dtype), fd.fp8_dequantize_ref(q, scale, dtype))


@pytest.mark.gpu
def test_cuda_op_round_trip_and_saved_bytes():
    x = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16)
    q, scale = torch.ops.memtrain.fp8_quantize(x)
    x_hat = torch.ops.memtrain.fp8_dequantize(q, scale, torch.bfloat16)
    _bound_holds(x.cpu(), x_hat.cpu(), scale.cpu(), torch.bfloat16)
    assert q.untyped_storage().nbytes() + scale.untyped_storage().nbytes() == 8192 * 2048 + 8192 * 4
