import itertools
import math

import pytest
import torch

from memcompile.data import cluster_sizes, facility_location_value, greedy_facility_location, l1_similarity


def brute_force_value(sim, k):
    n = sim.shape[1]
    return max(
        sum(max(sim[i, j].item() for j in subset) for i in range(sim.shape[0]))
        for subset in itertools.combinations(range(n), k)
    )


def random_sim(n, seed, d=5):
    g = torch.Generator().manual_seed(seed)
    return l1_similarity(torch.randn(n, d, generator=g, dtype=torch.float64))


def test_l1_similarity_matches_definition():
    x = torch.randn(6, 4, dtype=torch.float64)
    dist = torch.tensor([[(x[i] - x[j]).abs().sum().item() for j in range(6)] for i in range(6)], dtype=torch.float64)
    torch.testing.assert_close(l1_similarity(x), dist.max() - dist)


def test_value_and_gains():
    sim = random_sim(7, 0)
    picks, gains = greedy_facility_location(sim, 4)
    loop = sum(max(sim[i, j].item() for j in picks.tolist()) for i in range(7))
    assert facility_location_value(sim, picks).item() == pytest.approx(loop)
    # Gains telescope to the value of the set, and shrink (submodularity).
    assert gains.sum().item() == pytest.approx(loop)
    assert all(a >= b - 1e-12 for a, b in zip(gains, gains[1:]))
    assert facility_location_value(sim, []).item() == 0


@pytest.mark.parametrize("seed", range(12))
def test_greedy_against_exhaustive_optimum(seed):
    n = 5 + seed % 4
    sim = random_sim(n, seed)
    for k in range(1, 5):
        value = facility_location_value(sim, greedy_facility_location(sim, k)[0]).item()
        opt = brute_force_value(sim, k)
        assert value <= opt + 1e-9
        assert value >= (1 - 1 / math.e) * opt - 1e-9
        if k == 1:
            assert value == pytest.approx(opt, rel=0, abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_lazy_equals_naive(seed):
    n = [3, 9, 17, 40][seed % 4]
    sim = random_sim(n, 100 + seed, d=3)
    for k in (1, n // 2, n):
        lazy, lazy_gains = greedy_facility_location(sim, k, lazy=True)
        naive, naive_gains = greedy_facility_location(sim, k, lazy=False)
        assert lazy.tolist() == naive.tolist()
        assert torch.equal(lazy_gains, naive_gains)
        assert len(set(lazy.tolist())) == k


def test_lazy_equals_naive_with_ties():
    # Integer similarities (exact in float64) with many duplicated points: ties everywhere.
    g = torch.Generator().manual_seed(3)
    pts = torch.randint(0, 3, (24, 2), generator=g).double()
    sim = l1_similarity(pts)
    for k in (1, 5, 12, 24):
        assert greedy_facility_location(sim, k)[0].tolist() == greedy_facility_location(sim, k, lazy=False)[0].tolist()


def test_cluster_sizes_partition_the_points():
    sim = random_sim(11, 5)
    picks, _ = greedy_facility_location(sim, 3)
    sizes = cluster_sizes(sim, picks)
    assert sizes.sum().item() == 11 and (sizes >= 1).all()
    nearest = [max(picks.tolist(), key=lambda j: (sim[i, j].item(), -picks.tolist().index(j))) for i in range(11)]
    assert sizes.tolist() == [float(nearest.count(j)) for j in picks.tolist()]


def test_rejects_bad_inputs():
    with pytest.raises(ValueError):
        greedy_facility_location(torch.ones(3, 3), 4)
    with pytest.raises(ValueError):
        greedy_facility_location(-torch.ones(3, 3), 1)
