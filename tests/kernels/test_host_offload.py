import pytest
import torch

from memcompile.ops import memtrain, offload, offload_wait, reload, reload_wait

CPU = torch.device("cpu")


def _round_trip(x: torch.Tensor, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Host copy and device copy of ``x``, each waited for as the planner's graphs do."""
    h = offload(x)
    offload_wait(h, x)
    y = reload(h, device or x.device)
    reload_wait(y)
    return h, y


def _values(dtype: torch.dtype, shape=(5, 7)) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.randint(-2**40, 2**40, shape, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_round_trip_is_exact_and_copies(dtype):
    x = _values(dtype)
    h, y = _round_trip(x)
    assert h.device == CPU and h.dtype == dtype and h.shape == x.shape and h.is_contiguous()
    assert torch.equal(h, x) and torch.equal(y, x)
    assert h.data_ptr() != x.data_ptr() and y.data_ptr() != h.data_ptr()  # custom ops return no aliases


@pytest.mark.parametrize("make", [lambda: torch.randn(6, 4).t(), lambda: torch.randn(4, 10)[:, ::3],
                                  lambda: torch.randn(3, 1).expand(3, 5), lambda: torch.tensor(2.5),
                                  lambda: torch.randn(0, 3), lambda: torch.empty(0)],
                         ids=["transposed", "strided", "expanded", "0-d", "empty", "empty-1d"])
def test_round_trip_of_odd_layouts_is_contiguous_and_exact(make):
    x = make()
    h, y = _round_trip(x)
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
        torch.library.opcheck(memtrain.offload_wait.default, (offload(x), x),
                              test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(memtrain.reload_wait.default, (reload(offload(x), CPU),),
                              test_utils=("test_schema", "test_faketensor"))


def test_waits_are_kept_as_mutations():
    """Nothing reads a wait's result (it has none): it survives dead-code elimination because its schema
    mutates the copy it completes, which also orders the copy's readers after it."""
    for op in (memtrain.offload_wait.default, memtrain.reload_wait.default):
        assert op._schema.is_mutable and op._schema.arguments[0].alias_info.is_write
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    h = graph.call_function(memtrain.offload.default, (x,))
    graph.call_function(memtrain.offload_wait.default, (h, x))
    graph.output(None)
    graph.eliminate_dead_code()
    assert [n.target for n in graph.nodes if n.op == "call_function"] == [memtrain.offload.default,
                                                                         memtrain.offload_wait.default]


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
    b = (a * 2).sum(-1)  # runs beside the copy
    memtrain.offload_wait(h, a)
    y = memtrain.reload(h, x.device)
    c = b + 1
    memtrain.reload_wait(y)
    return y, a, c


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_function_is_exact(backend):
    x, w = torch.randn(8, 16), torch.randn(16, 32)
    y, a, b = torch.compile(_fn, backend=backend, fullgraph=True)(x, w)
    assert torch.equal(y, a)  # the copies are exact; the surrounding compute may round differently
    for got, expected in zip((a, b), _fn(x, w)[1:]):  # b is c here
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
    h, y = _round_trip(x)
    assert h.device == CPU and h.is_pinned() and h.shape == x.shape
    assert y.device == x.device and torch.equal(y, x) and torch.equal(h, x.cpu())
    for dtype in (torch.bfloat16, torch.int64):
        x = _values(dtype, (1000, 33)).cuda().t()
        assert torch.equal(_round_trip(x)[1], x)
    assert _round_trip(torch.empty(0, 4, device="cuda"))[1].shape == (0, 4)


@pytest.mark.gpu
def test_cuda_copies_are_asynchronous_until_their_waits():
    """The host returns from each start before its copy ends (so the ops after it run beside the copy)
    and the copy is complete once the wait has been passed on the compute stream."""
    from memcompile.kernels import host_offload

    x = torch.randn(64 * 2**20, device="cuda")  # 256 MiB: milliseconds over the host link
    torch.cuda.synchronize()
    h = offload(x)
    event = host_offload._pending[host_offload._key(h)]
    assert not event.query()  # still copying: the host was not blocked
    m = x[: 2**24].view(4096, 4096)
    busy = m @ m  # on the compute stream, beside the copy
    offload_wait(h, x)
    torch.cuda.current_stream().synchronize()
    assert event.query() and torch.equal(h, x.cpu())
    y = reload(h, x.device)
    reload_wait(y)
    assert torch.equal(y, x) and torch.equal(busy, m @ m)


@pytest.mark.gpu
def test_cuda_freed_input_memory_is_not_reused_before_the_copy_ends():
    x = torch.randn(16 * 2**20, device="cuda")
    expected = x.cpu()
    h = offload(x)
    offload_wait(h, x)
    del x  # freed after the wait: the blocks below are written after the copy on the compute stream
    junk = [torch.empty(16 * 2**20, device="cuda").fill_(float(i)) for i in range(8)]
    y = reload(h, torch.device("cuda"))
    reload_wait(y)
    assert torch.equal(y.cpu(), expected)
    del junk


@pytest.mark.gpu
def test_cuda_round_trips_reuse_pinned_blocks():
    stats = getattr(torch.cuda.memory, "host_memory_stats", None)
    if stats is None:
        pytest.skip("torch.cuda.memory.host_memory_stats needs a newer torch")
    x = torch.randn(4 * 2**20, device="cuda")

    def round_trip():
        y = _round_trip(x)[1]
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
    """Inductor reuses a buffer after its last use without the caching allocator: the wait takes the
    offloaded tensor as an input, so the buffers made beside the copy cannot be put in its memory, and
    the ones after the wait are written after the copy (host_offload's docstring)."""
    def fn(x, z):
        a = x * 2
        h = memtrain.offload(a)
        b = z @ z  # beside the copy, same size as a
        memtrain.offload_wait(h, a)
        c = b @ z  # after the wait: Inductor may put it in a's buffer
        return h, c

    x, z = torch.randn(4096, 4096, device="cuda"), torch.randn(4096, 4096, device="cuda")
    h, _ = torch.compile(fn, backend="inductor", fullgraph=True)(x, z)
    y = reload(h, x.device)
    reload_wait(y)
    assert torch.equal(y, x * 2)
