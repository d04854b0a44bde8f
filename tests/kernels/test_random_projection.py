import math

import pytest
import torch

from memcompile.kernels import random_projection as rp


@pytest.mark.parametrize("n, r", [(37, 5), (128, 32)])
def test_reference_is_seeded_gaussian_with_variance_one_over_r(n, r):
    p = rp.gaussian_sketch_ref(7, n, r, torch.float32, torch.device("cpu"))
    again = rp.gaussian_sketch_ref(7, n, r, torch.float32, torch.device("cpu"))
    other = rp.gaussian_sketch_ref(8, n, r, torch.float32, torch.device("cpu"))
    assert p.shape == (n, r) and torch.equal(p, again) and not torch.equal(p, other)
    expected = torch.randn(n, r, generator=torch.Generator().manual_seed(7)) / math.sqrt(r)
    torch.testing.assert_close(p, expected, rtol=1e-6, atol=0)


def test_triton_kernel_under_interpreter_is_deterministic_and_normal():
    pytest.importorskip("triton")
    n, r = 300, 50  # 15,000 draws, not a multiple of the block
    p = rp.gaussian_sketch_triton(11, n, r, torch.float32, torch.device("cpu"))
    assert torch.equal(p, rp.gaussian_sketch_triton(11, n, r, torch.float32, torch.device("cpu")))
    assert not torch.equal(p, rp.gaussian_sketch_triton(12, n, r, torch.float32, torch.device("cpu")))
    assert abs(p.mean().item()) < 4 / math.sqrt(r) / math.sqrt(n * r)  # 4 standard errors
    assert abs(p.var().item() * r - 1) < 0.05  # E[P P^T] = I needs var 1/r
    assert torch.isfinite(p).all() and (p != 0).all()


def test_op_routes_to_triton_only_when_asked(monkeypatch):
    seed = torch.tensor(5)
    ref = rp.gaussian_sketch_ref(5, 16, 4, torch.float32, torch.device("cpu"))
    assert torch.equal(torch.ops.memtrain.gaussian_sketch(seed, 16, 4, torch.float32, torch.device("cpu"), 0), ref)
    monkeypatch.setenv("MEMTRAIN_TRITON_ON_CPU", "1")
    if rp.use_triton(torch.device("cpu")):
        tri = torch.ops.memtrain.gaussian_sketch(seed, 16, 4, torch.float32, torch.device("cpu"), 0)
        assert torch.equal(tri, rp.gaussian_sketch_triton(5, 16, 4, torch.float32, torch.device("cpu")))


def test_opcheck():
    torch.library.opcheck(torch.ops.memtrain.gaussian_sketch.default,
                          (torch.tensor(3), 8, 2, torch.float32, torch.device("cpu"), 1),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
def test_cuda_kernel_matches_distribution():
    p = torch.ops.memtrain.gaussian_sketch(torch.tensor(3), 2048, 512, torch.bfloat16, torch.device("cuda"), 0)
    assert p.shape == (2048, 512) and p.dtype == torch.bfloat16
    assert abs(p.float().var().item() * 512 - 1) < 0.02
