"""Greedy maximisation of the facility-location function ``F(A) = sum_i max_{j in A} S_ij``.

``S`` is a dense non-negative similarity matrix (``S_ij = max(D) - D_ij`` for the L1 distances ``D``,
as CoLM uses). ``F`` is monotone submodular, so the greedy set of size ``k`` has
``F >= (1 - 1/e) * OPT``. The lazy variant (Minoux) keeps stale gains in a heap: by submodularity a
stale gain is an upper bound, so an element whose fresh gain still tops the heap is the greedy
choice. Ties go to the smaller index in both variants, so lazy and naive greedy pick the same set in
the same order.
"""
from __future__ import annotations

import heapq

import torch


def l1_similarity(features: torch.Tensor) -> torch.Tensor:
    """``S = max(D) - D`` with ``D`` the pairwise L1 distances of the rows of ``features``."""
    dist = torch.cdist(features, features, p=1)
    return dist.max() - dist


def facility_location_value(sim: torch.Tensor, selected: torch.Tensor | list[int]) -> torch.Tensor:
    """``F(A) = sum_i max_{j in A} S_ij`` (0 for the empty set)."""
    selected = torch.as_tensor(selected, dtype=torch.long, device=sim.device)
    if selected.numel() == 0:
        return sim.new_zeros(())
    return sim[:, selected].max(dim=1).values.sum()


def _gains(cand: torch.Tensor, covered: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    # ``cand`` is ``sim.T`` made contiguous: every gain is an inner reduction over one contiguous
    # row, whether one or all candidates are evaluated, so lazy and naive see identical numbers.
    return (cand[rows] - covered).clamp_(min=0).sum(dim=1)


def greedy_facility_location(
    sim: torch.Tensor, k: int, *, lazy: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``k`` columns of ``sim`` greedily; returns ``(indices, gains)`` in selection order.

    Args:
        sim: ``(n, n)`` non-negative similarities; row ``i`` is a point to cover, column ``j`` a
            candidate. Computed on the CPU in float64: the matrices are small and exact
            comparisons keep the two variants in agreement.
        k: how many to pick, ``0 <= k <= n``.
        lazy: lazy greedy (default) or the naive ``O(k n^2)`` loop.
    """
    n = sim.shape[1]
    if not 0 <= k <= n:
        raise ValueError(f"cannot pick {k} of {n}")
    sim = sim.detach().to("cpu", torch.float64)
    if (sim < 0).any():
        raise ValueError("facility location needs non-negative similarities")
    cand = sim.T.contiguous()
    covered = sim.new_zeros(sim.shape[0])
    picks: list[int] = []
    gains: list[float] = []
    if lazy:
        initial = _gains(cand, covered, torch.arange(n)).tolist()
        heap = [(-g, j) for j, g in enumerate(initial)]
        heapq.heapify(heap)
        while len(picks) < k:
            _, j = heapq.heappop(heap)
            fresh = _gains(cand, covered, torch.tensor([j])).item()
            # Accept when (-fresh, j) still sorts first: no other bound can beat it.
            if not heap or (-fresh, j) <= heap[0]:
                picks.append(j)
                gains.append(fresh)
                covered = torch.maximum(covered, cand[j])
            else:
                heapq.heappush(heap, (-fresh, j))
    else:
        available = torch.ones(n, dtype=torch.bool)
        all_columns = torch.arange(n)
        for _ in range(k):
            g = _gains(cand, covered, all_columns)
            g[~available] = -torch.inf
            j = int(torch.argmax(g))  # first maximum: same tie rule as the heap
            picks.append(j)
            gains.append(g[j].item())
            available[j] = False
            covered = torch.maximum(covered, cand[j])
    return torch.tensor(picks, dtype=torch.long), torch.tensor(gains, dtype=torch.float64)


def cluster_sizes(sim: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """How many points each selected element covers best (itself included; ties to the first)."""
    nearest = sim[:, selected].argmax(dim=1)
    return torch.bincount(nearest, minlength=len(selected)).to(sim.dtype)
