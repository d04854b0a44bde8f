"""Fira: GaLore low-rank Adam plus norm-based scaling of the discarded gradient residual.

Chen et al., "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?"
(arXiv 2410.01623). The update reproduces the official ``FiraAdamW`` (``xichen-fy/Fira``,
``optimizer_torch/fira_adamw.py``); ``alpha_mode="paper"`` switches to the paper's Algorithm 1.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from memcompile.marks import grad_approximation, link_unsharded
from memcompile.optim.projection import (
    align_signs,
    change_of_basis,
    orthogonal_basis,
    project,
    project_back,
    projects_right,
    to_new_basis,
)

__all__ = ["Fira", "fira_param_groups"]

# Denominator guards of the official code (scaling factor and limiter); not tied to ``eps``.
_PHI_EPS = 1e-8
_LIMITER_EPS = 1e-8

_ALPHA_MODES = ("code", "paper")
_MOMENT_TRANSFERS = ("official", "align", "rotate")


class Fira(torch.optim.Optimizer):
    r"""Fira (and, with ``residual=False``, GaLore) for 2-D weights; AdamW for every other group.

    A parameter group with ``rank`` set (not ``None``) gets Fira. Each of its matrices
    ``G`` (``m x n``) is projected onto the top-``r`` singular vectors of its gradient, refreshed every
    ``update_proj_gap`` steps (at state step ``t = 0, T, 2T, ...``, ``t`` counted before the step):
    ``R = G Q^T`` with ``Q = Vh[:r]`` when ``m >= n``, else ``R = P^T G`` with ``P = U[:, :r]``.
    Adam runs on ``R`` only; ``N = M / (sqrt(V) + eps)``, bias correction folded into the step size
    ``lr * sqrt(1 - beta2^t) / (1 - beta1^t)``. The residual the projection drops is rescaled by
    ``phi = ||N|| / (||R|| + 1e-8)`` per row of ``R`` (right projection) or per column (left), and
    its Frobenius norm may grow by at most ``gamma`` per step (the first step sets the reference):

    - ``alpha_mode="code"`` (official code, used for the published numbers):
      ``S = phi * (G - alpha * back(R))``, ``W -= step * (alpha * back(N) + S)``.
    - ``alpha_mode="paper"`` (Algorithm 1): ``S = phi * (G - back(R))``,
      ``W -= step * alpha * (back(N) + S)``.
    - ``residual=False``: GaLore, ``W -= step * alpha * back(N)`` (same projector and moments).

    At a refresh the moments, built in the old basis's coordinates, meet a new basis whose vectors an SVD
    fixes only up to sign (and, for near-equal singular values, up to a rotation). ``moment_transfer``
    says what carries over; in every mode the step count (so the bias correction) and the limiter's
    reference norm ``||S_{t-1}||`` are kept: ``S`` is a full-size matrix whose norm no choice of basis
    vectors changes, and where the subspace persists the moments keep their whole history.

    - ``"official"``: the moments are used as they are in the new basis (the official code). Momentum
      along a persisting direction is applied with whichever sign the SVD returned, so round-off decides
      whether it helps or pushes the wrong way.
    - ``"align"``: each new basis vector whose inner product with its predecessor (same index) is
      negative is negated; the moments are kept. A refresh that returns the same vectors up to sign is
      then no refresh at all.
    - ``"rotate"``: the moments are expressed in the new basis with ``C = Q_old Q_new^T`` (right; left:
      ``C = P_old^T P_new``). ``M <- M C`` (left ``C^T M``): momentum outside the new subspace is
      dropped. ``V`` is the per-coordinate second moment; with coordinates taken as uncorrelated (Adam's
      own diagonal assumption) the new coordinate ``sum_i c_ij R_i`` has ``V_j = sum_i c_ij^2 V_i``, so
      ``V <- V (C*C)`` (elementwise square of ``C``; left ``(C*C)^T V``). This never goes negative, keeps
      ``|M_j| / sqrt(V_j)`` at most the norm of the row's old ``M / sqrt(V)`` (Cauchy-Schwarz), and is
      exact for any signed permutation. The share ``1 - sum_i c_ij^2`` of a direction the old subspace did not hold
      gets the mean ``V`` of the row (right) or column (left): a zero there, under the step count's bias
      correction, would make a new direction's first steps several times larger than the others' (up to
      6.6x with the default betas, ~12 steps after the refresh).

    Groups without ``rank`` get AdamW with the same formula (``eps`` outside the bias correction,
    as the official code). Weight decay is decoupled and applied after the update:
    ``W -= lr * weight_decay * W``.

    Precision: moments, projector and the limiter's reference norm are kept in fp32 (fp64 for fp64
    params), and the SVD and the update run in that precision; the update is then added to the
    parameter in the parameter's own dtype (bf16 params are rounded once per step).

    Optimizer state per Fira matrix (fp32): two moments shaped like ``R`` (``m x r`` or ``r x n``),
    the projector (``r x n`` or ``m x r``) and one scalar for the limiter; see :meth:`state_bytes`.

    Args:
        params: parameters or parameter groups; see :func:`fira_param_groups`.
        lr: learning rate.
        betas: Adam's ``(beta1, beta2)``.
        eps: added to ``sqrt(V)`` (not bias corrected, as the official code).
        weight_decay: decoupled weight decay, applied after the update with the un-corrected ``lr``.
        rank: default rank for groups that do not set one; ``None`` leaves such groups on AdamW.
            Must be ``>= 1``; each matrix uses ``min(rank, m, n)``.
        update_proj_gap: steps between projector refreshes (``T``).
        alpha: scale ``alpha`` of the projected-back update.
        gamma: norm-growth limit of the scaled residual; ``None`` disables the limiter.
        alpha_mode: ``"code"`` (default) or ``"paper"``, see above.
        residual: ``False`` turns Fira into GaLore at the same rank.
        moment_transfer: ``"align"`` (default), ``"official"`` or ``"rotate"``: what the moments become
            at a projector refresh, see above. ``"official"`` reproduces the official code (and the
            published numbers) step for step.
        correct_bias: fold Adam's bias correction into the step size.

    Under FSDP2 (``fully_shard``, parameters sharded on dim 0): each Fira matrix's gradient is
    all-gathered and every process computes the same update from it (the projector and moments are
    replicated, not sharded), then applies its own rows; the steps equal one process's. Per process
    that adds one layer's full gradient and update while they are computed, and the low-rank state of
    every matrix. Build the groups with :func:`fira_param_groups` (on every process), so the refusal
    of approximated gradients below sees the backend's marks. Other placements are refused.

    Raises:
        ValueError: a group with ``rank`` holds a parameter that is not 2-D, or an option is out of
            range; at :meth:`step`, a Fira parameter's gradient is approximated by the memtrain backend
            (see :func:`memcompile.marks.grad_approximation`).

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
        >>> groups = fira_param_groups(model, rank=4, targets=("0", "2"))
        >>> opt = Fira(groups, lr=1e-2)
        >>> model(torch.randn(16, 64)).square().mean().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        rank: int | None = None,
        update_proj_gap: int = 200,
        alpha: float = 0.25,
        gamma: float | None = 1.01,
        alpha_mode: str = "code",
        residual: bool = True,
        moment_transfer: str = "align",
        correct_bias: bool = True,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, alpha=alpha, gamma=gamma, alpha_mode=alpha_mode,
                        residual=residual, moment_transfer=moment_transfer, correct_bias=correct_bias)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            _validate_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Checked for every parameter before any is updated, so a refusal leaves the model untouched.
        self._check_exact_gradients()

        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Fira does not support sparse gradients")
                if group["rank"] is None:
                    self._adamw_step(p, group)
                else:
                    self._fira_step(p, group)
        return loss

    def _check_exact_gradients(self) -> None:
        for group in self.param_groups:
            # GaLore (residual=False) only uses the projected gradient, like AdamW uses the gradient
            # it is given; the full-rank residual is what an approximated gradient makes meaningless.
            if group["rank"] is None or not group["residual"]:
                continue
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                method = grad_approximation(p)
                if method is None or p.grad is None:
                    continue
                what = f"'{names[i]}' " if names else ""
                raise ValueError(
                    f"Fira needs the exact weight gradient, but parameter {what}of shape "
                    f"{tuple(p.shape)} gets its gradient from the {method!r} approximation of the "
                    "memtrain backend (its residual G - P P^T G would be built from the approximation). "
                    "Exclude these layers from activation compression (e.g. "
                    "options={'activation': 'none'}), or compress only layers that Fira does not "
                    "manage (leave them out of the group with 'rank', e.g. via "
                    "fira_param_groups(..., targets=...))."
                )

    def _adamw_step(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        dtype = _state_dtype(p)
        grad = p.grad.to(dtype)
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
        state["step"] += 1
        norm_grad = _adam_direction(state, grad, group)
        p.add_(norm_grad, alpha=-_step_size(group, state["step"]))
        _decay(p, group)

    def _fira_step(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        if _is_dtensor(p):
            return self._fira_step_sharded(p, group)
        update = self._fira_update(self.state[p], p.grad.to(_state_dtype(p)), group)
        p.add_(update, alpha=-_step_size(group, self.state[p]["step"]))
        _decay(p, group)

    def _fira_step_sharded(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """A DTensor parameter (FSDP2): its gradient is all-gathered and every process runs the same
        update on the whole matrix (the low-rank state replicated), then applies its own rows of it.
        The same steps as one process; per process it costs one layer's full gradient and update
        while they are computed, and the projector and moments of every Fira matrix."""
        from torch.distributed.tensor import Shard

        mesh = p.device_mesh
        if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise NotImplementedError(
                f"Fira handles DTensor parameters sharded on dim 0 over one mesh dimension (FSDP2's "
                f"fully_shard), not placements {tuple(p.placements)} on a {mesh.ndim}-D mesh; put this "
                "parameter in a group without 'rank' (AdamW), or train it without this sharding (DDP)")
        update = self._fira_update(self.state[p], p.grad.full_tensor().to(_state_dtype(p)), group)
        local = p.to_local()
        chunks, rank = torch.chunk(update, mesh.size(), dim=0), mesh.get_local_rank()
        mine = chunks[rank] if rank < len(chunks) else update[:0]  # fewer rows than processes
        if mine.shape != local.shape:  # FSDP2 and DTensor split dim 0 as torch.chunk does
            raise NotImplementedError(f"Fira: a local shard of shape {tuple(local.shape)} is not the "
                                      f"torch.chunk rows {tuple(mine.shape)} of the {tuple(p.shape)} matrix")
        local.add_(mine.to(local.dtype), alpha=-_step_size(group, self.state[p]["step"]))
        _decay(local, group)

    def _fira_update(self, state: dict[str, Any], grad: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Advance ``state`` by the (full) gradient ``grad``; the update before the step size."""
        if "step" not in state:
            state["step"] = 0
        if "projector" not in state or state["step"] % group["update_proj_gap"] == 0:
            state["projector"] = self._refresh(state, grad, group)
        basis = state["projector"]
        low_rank = project(grad, basis)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(low_rank)
            state["exp_avg_sq"] = torch.zeros_like(low_rank)
        state["step"] += 1
        norm_grad = _adam_direction(state, low_rank, group)

        alpha = group["alpha"]
        update = project_back(norm_grad, basis, grad.shape)
        if group["residual"]:
            paper = group["alpha_mode"] == "paper"
            scaled = self._scaled_residual(state, grad, low_rank, norm_grad, basis, group)
            if paper:
                update.add_(scaled).mul_(alpha)
            else:
                update.mul_(alpha).add_(scaled)
        else:
            update.mul_(alpha)
        return update

    @staticmethod
    def _refresh(state: dict[str, Any], grad: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """The new projector, with the moments carried into it as ``moment_transfer`` says."""
        new = orthogonal_basis(grad, group["rank"])
        old, transfer = state.get("projector"), group["moment_transfer"]
        if old is None or "exp_avg" not in state or transfer == "official":
            return new
        if transfer == "align":
            return align_signs(new, old, grad.shape)
        c = change_of_basis(old, new, grad.shape)
        square = c.square()
        exp_avg_sq = state["exp_avg_sq"]
        state["exp_avg"] = to_new_basis(state["exp_avg"], c, grad.shape)
        # Share of each new direction's second moment that the old subspace did not hold (0 where it
        # persists; clamped: round-off can push the held share past 1).
        unheld = (1.0 - square.sum(dim=0)).clamp_(min=0.0)
        if projects_right(grad.shape):
            fill = exp_avg_sq.mean(dim=1, keepdim=True) * unheld
        else:
            fill = exp_avg_sq.mean(dim=0, keepdim=True) * unheld[:, None]
        state["exp_avg_sq"] = to_new_basis(exp_avg_sq, square, grad.shape).add_(fill)
        return new

    @staticmethod
    def _scaled_residual(
        state: dict[str, Any],
        grad: torch.Tensor,
        low_rank: torch.Tensor,
        norm_grad: torch.Tensor,
        basis: torch.Tensor,
        group: dict[str, Any],
    ) -> torch.Tensor:
        """``S``: the residual scaled per row/column of ``R``, then passed through the limiter."""
        # The official code subtracts its alpha-scaled project_back, so "code" keeps (1 - alpha) of
        # the in-subspace gradient in the residual.
        back = project_back(low_rank, basis, grad.shape)
        scale_back = group["alpha"] if group["alpha_mode"] == "code" else 1.0
        residual = back.mul_(-scale_back).add_(grad)

        # One factor per row of R (m x r) for a right projection, per column of R (r x n) for a left
        # one: always along the dimension the projection keeps.
        dim = 1 if projects_right(grad.shape) else 0
        phi = norm_grad.norm(dim=dim, keepdim=True) / (low_rank.norm(dim=dim, keepdim=True) + _PHI_EPS)
        residual.mul_(phi)

        gamma = group["gamma"]
        if gamma is not None:
            norm = residual.norm()
            if "limiter_ref" in state:
                # Relative cap: ||S_t|| <= gamma * ||S_{t-1}||; tensor ops avoid a device sync.
                limiter = torch.clamp(norm / (state["limiter_ref"] + _LIMITER_EPS), min=gamma) / gamma
                residual.div_(limiter)
                state["limiter_ref"] = norm / limiter
            else:
                state["limiter_ref"] = norm
        return residual

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Checkpoints from before the option were trained with the official behaviour; they resume with it.
        for group in self.param_groups:
            group.setdefault("moment_transfer", "official")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # The base class casts floating state to each parameter's dtype; this optimizer keeps its
        # state in fp32 for bf16/fp16 params, so restore the saved dtypes. Fresh copies also keep the
        # live state from aliasing the caller's dict.
        saved_ids = (i for g in state_dict["param_groups"] for i in g["params"])
        params = (p for g in self.param_groups for p in g["params"])
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            for key, value in saved.items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device, dtype=value.dtype, copy=True)

    def state_bytes(self, params: Iterable[torch.Tensor] | None = None) -> int:
        """Bytes held in optimizer-state tensors, for ``params`` (default: every parameter).

        For a Fira matrix of shape ``(m, n)`` with fp32 state and effective rank ``r``:
        ``4 * (2*m*r + r*n + 1)`` when ``m >= n``, ``4 * (2*r*n + m*r + 1)`` otherwise (moments,
        projector, limiter scalar; no scalar when ``gamma`` is ``None`` or ``residual=False``).
        An AdamW parameter holds ``2 * numel`` fp32 values. The integer step count is not a tensor.
        """
        chosen = self.state.keys() if params is None else params
        total = 0
        for p in chosen:
            for value in self.state.get(p, {}).values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        return total


def fira_param_groups(
    model: nn.Module,
    rank: int = 128,
    targets: Sequence[str] | str = ("attn", "mlp"),
    **fira_options: Any,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into an AdamW group and a Fira group.

    Like the official ``divide_params``: the weight of every ``nn.Linear`` whose module name contains
    one of ``targets`` (substring match) goes into the Fira group; every other trainable parameter
    (embeddings, norms, biases, ``lm_head`` unless targeted) goes into the AdamW group. Frozen
    parameters are left out. Empty groups are omitted.

    Args:
        model: the model to split.
        rank: Fira rank of the targeted weights.
        targets: substrings of module names; LLaMA's ``self_attn`` and ``mlp`` match the defaults.
        **fira_options: extra options of the Fira group (``update_proj_gap``, ``alpha``, ``gamma``,
            ``alpha_mode``, ``residual``, ``lr``, ...).

    Example:
        >>> groups = fira_param_groups(model, rank=128, alpha=0.25)
        >>> opt = Fira(groups, lr=1e-2)
    """
    if isinstance(targets, str):
        targets = (targets,)
    fira_ids = {
        id(module.weight)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module.weight.requires_grad
        and any(t in name for t in targets)
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Under FSDP2 the optimizer holds sharded parameters and the backend marks the unsharded ones.
    link_unsharded(model)
    fira = [p for p in trainable if id(p) in fira_ids]
    rest = [p for p in trainable if id(p) not in fira_ids]
    groups: list[dict[str, Any]] = []
    if rest:
        groups.append({"params": rest, "rank": None})
    if fira:
        groups.append({"params": fira, "rank": rank, **fira_options})
    return groups


def _validate_group(group: dict[str, Any]) -> None:
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"Invalid betas: {group['betas']}; each must be in [0, 1)")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid eps: {eps}")
    if not 0.0 <= group["weight_decay"]:
        raise ValueError(f"Invalid weight_decay: {group['weight_decay']}")

    rank = group["rank"]
    if rank is None:
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"Invalid rank: {rank!r}; must be an int >= 1 (or None for AdamW)")
    gap = group["update_proj_gap"]
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise ValueError(f"Invalid update_proj_gap: {gap!r}; must be an int >= 1")
    if group["alpha_mode"] not in _ALPHA_MODES:
        raise ValueError(f"Invalid alpha_mode: {group['alpha_mode']!r}; expected one of {_ALPHA_MODES}")
    if group["moment_transfer"] not in _MOMENT_TRANSFERS:
        raise ValueError(f"Invalid moment_transfer: {group['moment_transfer']!r}; expected one of "
                         f"{_MOMENT_TRANSFERS}")
    gamma = group["gamma"]
    if gamma is not None and not gamma > 0.0:
        raise ValueError(f"Invalid gamma: {gamma}; must be > 0 (or None to disable the limiter)")
    # Accepted for compatibility with the official group dicts; only the default projector exists.
    if group.get("proj_type", "std") != "std":
        raise ValueError(f"Unsupported proj_type: {group['proj_type']!r}; only 'std' is implemented")
    names = group.get("param_names")
    for i, p in enumerate(group["params"]):
        if p.dim() != 2:
            what = f"'{names[i]}' " if names else ""
            raise ValueError(
                f"Fira projects 2-D weight matrices only, but the group with rank={rank} holds "
                f"parameter {what}of shape {tuple(p.shape)}. Put it in a group without 'rank' "
                "(it then gets AdamW), e.g. with fira_param_groups(model, rank)."
            )


def _is_dtensor(p: torch.Tensor) -> bool:
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)  # not imported: not one
    return dtensor is not None and isinstance(p, dtensor)


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.promote_types(p.dtype, torch.float32)


def _adam_direction(state: dict[str, Any], grad: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """Update the moments with ``grad`` and return ``M / (sqrt(V) + eps)`` (no bias correction)."""
    beta1, beta2 = group["betas"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    return exp_avg / exp_avg_sq.sqrt().add_(group["eps"])


def _step_size(group: dict[str, Any], step: int) -> float:
    lr = group["lr"]
    if not group["correct_bias"]:
        return lr
    beta1, beta2 = group["betas"]
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def _decay(p: torch.Tensor, group: dict[str, Any]) -> None:
    if group["weight_decay"] > 0.0:
        p.add_(p, alpha=-group["lr"] * group["weight_decay"])
