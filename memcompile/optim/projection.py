"""GaLore-style low-rank projection of a 2-D gradient (the "std" projector of GaLore and Fira).

For ``G`` of shape ``(m, n)`` and rank ``r``:

- ``m >= n``: right projection. ``Q = Vh[:r]`` (``r x n``), ``R = G Q^T`` (``m x r``), ``back(X) = X Q``.
- ``m < n``: left projection. ``P = U[:, :r]`` (``m x r``), ``R = P^T G`` (``r x n``), ``back(X) = P X``.

The projected side is always the smaller dimension, so the basis is the smaller of the two factors.
``back`` here carries no scale; the optimizer applies ``alpha`` where its update rule says so.
"""
from __future__ import annotations

import torch


def effective_rank(rank: int, shape: torch.Size | tuple[int, ...]) -> int:
    """The rank actually used for a matrix of ``shape``: ``min(rank, m, n)``.

    The SVD has only ``min(m, n)`` singular vectors, so a larger rank is clamped (at which point the
    projection keeps the whole gradient).
    """
    m, n = shape
    return min(rank, m, n)


def projects_right(shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether a gradient of ``shape`` is projected from the right (``m >= n``) or the left."""
    m, n = shape
    return m >= n


def orthogonal_basis(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-``rank`` singular vectors of ``grad`` on its smaller side: ``Vh[:r]`` or ``U[:, :r]``.

    The SVD runs in at least fp32 (bf16/fp16 SVD is unsupported or inaccurate); the basis is returned
    in that precision.
    """
    work = grad.to(torch.promote_types(grad.dtype, torch.float32))
    u, _, vh = torch.linalg.svd(work, full_matrices=False)
    r = effective_rank(rank, grad.shape)
    if projects_right(grad.shape):
        return vh[:r].contiguous()
    return u[:, :r].contiguous()


def project(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``G Q^T`` (right) or ``P^T G`` (left); ``grad`` and ``basis`` share a dtype."""
    if projects_right(grad.shape):
        return grad @ basis.T
    return basis.T @ grad


def project_back(low_rank: torch.Tensor, basis: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``X Q`` (right) or ``P X`` (left), a full ``shape`` matrix; no ``alpha`` applied."""
    if projects_right(shape):
        return low_rank @ basis
    return basis @ low_rank
