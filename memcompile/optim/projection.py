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


def align_signs(new: torch.Tensor, old: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """``new`` with every basis vector negated whose inner product with its predecessor in ``old`` is < 0.

    An SVD fixes each singular vector only up to its sign; this picks the sign that continues ``old``.
    """
    dim = 1 if projects_right(shape) else 0   # vectors are the rows of Q, the columns of P
    dots = (new * old).sum(dim=dim, keepdim=True)
    return torch.where(dots < 0, -new, new)


def change_of_basis(old: torch.Tensor, new: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """``C`` (``r x r``), ``C[i, j] = <old_i, new_j>``: coordinates in ``old`` become coordinates in ``new``.

    Right: ``X Q_old Q_new^T = X C``; left: ``P_new^T P_old X = C^T X``. What lies outside the new
    subspace is dropped (the orthogonal projection onto it).
    """
    return old @ new.T if projects_right(shape) else old.T @ new


def to_new_basis(low_rank: torch.Tensor, c: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """``X C`` (right) or ``C^T X`` (left): a low-rank matrix re-expressed with :func:`change_of_basis`."""
    return low_rank @ c if projects_right(shape) else c.T @ low_rank
