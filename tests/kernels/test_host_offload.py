import pytest
import torch

from memcompile.ops import memtrain, offload, reload

CPU = torch.device("cpu")


def _values(dtype: torch.dtype, shape=(5, 7)) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.randint(-2**40, 2**40, shape, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_round_trip_is_exact_and_copies(dtype):
    x = _values(dtype)
    h = offload(x)
    assert h.device == CPU and h.dtype == dtype and h.shape == x.shape and h.is_contiguous()
    y = reload(h, CPU)
    assert torch.equal(h, x) and torch.equal(y, x)
    assert h.data_ptr() != x.data_ptr() and y.data_ptr() != h.data_ptr()  # custom ops return no aliases


@pytest.mark.parametrize("make", [lambda: torch.randn(6, 4).t(), lambda: torch.randn(4, 10)[:, ::3],
                                  lambda: torch.randn(3, 1).expand(3, 5), lambda: torch.tensor(2.5),
                                  lambda: torch.randn(0, 3), lambda: torch.empty(0)],
                         ids=["transposed", "strided", "expanded", "0-d", "empty", "empty-1d"])
def test_round_trip_of_odd_layouts_is_contiguous_and_exact(make):
    x = make()
    h = offload(x)
    y = reload(h, CPU)
    assert h.shape == y.shape == x.shape and h.is_contiguous() and y.is_contiguous()
    assert torch.equal(h, x) and torch.equal(y, x)


def test_meta():
    h = offload(torch.empty(2, 3, dtype=torch.bfloat16, device="meta"))
    assert h.device == CPU and h.shape == (2, 3) and h.dtype == torch.bfloat16
    y = reload(torch.ones(2, 3), torch.device("meta"))
    assert y.device.type == "meta" and y.shape == (2, 3)


def test_opcheck():
    for x in (torch.randn(3, 4), torch.randn(4, 3).t(), torch.arange(6), torch.tensor(1.0)):
        torch.library.opcheck(memtrain.offload.default, (x,), test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(memtrain.reload.default, (offload(x), CPU),
                              test_utils=("test_schema", "test_faketensor"))


def test_fake_results_are_on_the_host_then_on_the_target_device():
    from memcompile._torch_compat import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 8, device="cuda")  # fake: no GPU needed
        h = offload(x)
        y = reload(h, torch.device("cuda"))
    assert h.device == CPU and y.device.type == "cuda" and y.shape == x.shape and y.dtype == x.dtype


def _fn(x, w):
    a = torch.relu(x @ w)
    h = memtrain.offload(a)
    b = (a * 2).sum(-1)
    return memtrain.reload(h, x.device), a, b


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_function_is_exact(backend):
    x, w = torch.randn(8, 16), torch.randn(16, 32)
    y, a, b = torch.compile(_fn, backend=backend, fullgraph=True)(x, w)
    assert torch.equal(y, a)  # the copies are exact; the surrounding compute may round differently
    for got, expected in zip((a, b), _fn(x, w)[1:]):
        torch.testing.assert_close(got, expected)


def test_unused_offload_is_dropped_and_duplicates_are_harmless():
    from memcompile._torch_compat import aot_autograd, make_boxed_func

    graphs = []

    def fw_compiler(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def fn(x):
        memtrain.offload(x)  # unused: functional, so dead code
        h1, h2 = memtrain.offload(x), memtrain.offload(x)  # CSE may merge these, or the reloads of h1
        return memtrain.reload(h1, x.device) + memtrain.reload(h2, x.device) + memtrain.reload(h1, x.device)

    x = torch.randn(5)
    assert torch.equal(torch.compile(fn, backend=aot_autograd(fw_compiler=fw_compiler), fullgraph=True)(x), x * 3)
    targets = [n.target for n in graphs[0].graph.nodes]
    assert 1 <= targets.count(memtrain.offload.default) <= 2 and 1 <= targets.count(memtrain.reload.default) <= 3


# --- CUDA: pinned memory, a side-stream copy, the caching host allocator ---

@pytest.mark.gpu
def test_cuda_result_is_pinned_and_round_trip_is_exact():
    x = torch.randn(16 * 2**20, device="cuda")  # 64 MiB
    h = offload(x)
    assert h.device == CPU and h.is_pinned() and h.shape == x.shape
    y = reload(h, x.device)
    assert y.device == x.device and torch.equal(y, x)
    for dtype in (torch.bfloat16, torch.int64):
        x = _values(dtype, (1000, 33)).cuda().t()
        assert torch.equal(reload(offload(x), torch.device("cuda")), x)
    assert reload(offload(torch.empty(0, 4, device="cuda")), torch.device("cuda")).shape == (0, 4)


@pytest.mark.gpu
def test_cuda_freed_input_memory_is_not_reused_before_the_copy_ends():
    x = torch.randn(16 * 2**20, device="cuda")
    expected = x.cpu()
    h = offload(x)
    del x  # record_stream keeps its block from the tensors below until the side stream is done
    junk = [torch.empty(16 * 2**20, device="cuda").fill_(float(i)) for i in range(8)]
    y = reload(h, torch.device("cuda"))
    assert torch.equal(y.cpu(), expected)
    del junk


@pytest.mark.gpu
def test_cuda_round_trips_reuse_pinned_blocks():
    stats = getattr(torch.cuda.memory, "host_memory_stats", None)
    if stats is None:
        pytest.skip("torch.cuda.memory.host_memory_stats needs a newer torch")
    x = torch.randn(4 * 2**20, device="cuda")

    def round_trip():
        y = reload(offload(x), x.device)
        torch.cuda.current_stream().synchronize()  # both copies done: the pinned block is free again
        return y

    for _ in range(5):
        round_trip()
    key = next((k for k in ("num_host_alloc", "allocations.allocated") if k in stats()), None)
    if key is None:
        pytest.skip(f"no pinned allocation count among {sorted(stats())}")
    before = stats()[key]
    for _ in range(100):
        y = round_trip()
    assert stats()[key] - before <= 1
    assert torch.equal(y, x)


@pytest.mark.gpu
def test_cuda_inductor_buffer_reuse_after_offload():
    """Inductor may put a later buffer into the offloaded one's memory: the compute stream waits for the
    copy first (host_offload's docstring), so the copy still holds the old values."""
    def fn(x, z):
        a = x * 2
        h = memtrain.offload(a)
        return h, z @ z  # same size as a: Inductor may put it in a's buffer

    x, z = torch.randn(4096, 4096, device="cuda"), torch.randn(4096, 4096, device="cuda")
    h, _ = torch.compile(fn, backend="inductor", fullgraph=True)(x, z)
    assert torch.equal(reload(h, x.device), x * 2)
