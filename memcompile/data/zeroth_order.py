"""Per-example gradients of one parameter block: zeroth-order (SPSA/MeZO) estimate or exact.

Zeroth order: with ``z ~ N(0, I)`` shaped like the block ``theta``,
``g_i = (L_i(theta + eps z) - L_i(theta - eps z)) / (2 eps) * z``, an estimate of the projection
``(z . grad L_i) z`` with error ``O(eps^2)``. The prefix runs once under ``inference_mode``; only the
suffix (see ``split_forward``) runs twice. The block is restored bit-exactly from a copy, not by
adding ``eps z`` back.

NOTE: in bf16/fp16 the loss difference at ``eps = 1e-3`` is close to the rounding of the losses
themselves (the official setting runs so); fp32 gives a clean estimate.

Exact: per-example autograd through the suffix only, one backward per example. Meant for tests and
small models.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from .losses import per_example_causal_lm_loss
from .split_forward import ModelSplit, PrefixCache


class DirectionSampler:
    """Perturbation directions ``z`` from a seeded generator.

    Args:
        seed: seeds the generator on the block's device at the first draw.
        fixed: reuse the first direction for every step (the official code). Every zeroth-order
            feature is then a scalar multiple of that one ``z``, so the selection only orders a
            scalar per example. The default draws a fresh ``z`` per step.
    """

    def __init__(self, seed: int = 0, fixed: bool = False):
        self.seed = seed
        self.fixed = fixed
        self._generator: torch.Generator | None = None
        self._fixed_z: torch.Tensor | None = None

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if self.fixed and self._fixed_z is not None:
            return self._fixed_z
        if self._generator is None:
            self._generator = torch.Generator(device=like.device).manual_seed(self.seed)
        z = torch.randn(like.shape, generator=self._generator, device=like.device, dtype=like.dtype)
        if self.fixed:
            self._fixed_z = z
        return z

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": None if self._generator is None else self._generator.get_state(),
            "fixed_z": self._fixed_z,
        }

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | str = "cpu") -> None:
        self._generator = None
        if state["generator"] is not None:
            self._generator = torch.Generator(device=device)
            self._generator.set_state(state["generator"])
        self._fixed_z = state["fixed_z"]


def _chunks(n: int, size: int | None) -> Iterator[slice]:
    step = size or n
    for lo in range(0, n, step):
        yield slice(lo, min(lo + step, n))


def _rows(inputs: Mapping[str, Any], rows: slice) -> dict[str, Any]:
    return {k: v[rows] for k, v in inputs.items()}


@contextmanager
def _perturbed(param: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yields a copy of ``param``'s value and restores it on exit, whatever happened inside."""
    saved = param.detach().clone()
    try:
        yield saved
    finally:
        with torch.no_grad():
            param.copy_(saved)


def zeroth_order_gradients(
    split: ModelSplit,
    inputs: Mapping[str, Any],
    labels: torch.Tensor,
    direction: torch.Tensor,
    *,
    eps: float = 1e-3,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``(n, numel)`` zeroth-order per-example gradients of ``split.param`` along ``direction``.

    Returns float32, or float64 when the model runs in float64.
    """
    param = split.param
    n = labels.shape[0]
    with torch.inference_mode():
        caches = [split.run_prefix(_rows(inputs, r)) for r in _chunks(n, chunk_size)]

    def losses() -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat(
                [
                    per_example_causal_lm_loss(split.run_suffix(c), labels[r])
                    for c, r in zip(caches, _chunks(n, chunk_size))
                ]
            )

    with _perturbed(param) as theta:
        with torch.no_grad():
            param.add_(direction, alpha=eps)
        plus = losses()
        with torch.no_grad():
            param.copy_(theta).sub_(direction, alpha=eps)
        minus = losses()
    # Clone out of inference mode so callers may use the result under autograd.
    coeff = ((plus - minus) / (2 * eps)).clone()
    return coeff[:, None] * direction.reshape(1, -1).to(coeff.dtype)


def exact_gradients(
    split: ModelSplit,
    inputs: Mapping[str, Any],
    labels: torch.Tensor,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``(n, numel)`` exact per-example gradients of ``split.param`` (one backward each)."""
    param = split.param
    n = labels.shape[0]
    out_dtype = torch.promote_types(param.dtype, torch.float32)
    grads = torch.empty(n, param.numel(), dtype=out_dtype, device=param.device)
    was_trainable = param.requires_grad
    param.requires_grad_(True)
    try:
        for rows in _chunks(n, chunk_size):
            # no_grad, not inference_mode: the cached inputs are saved for the backward below.
            with torch.no_grad():
                cache: PrefixCache = split.run_prefix(_rows(inputs, rows))
            with torch.enable_grad():
                losses = per_example_causal_lm_loss(split.run_suffix(cache), labels[rows])
                for i, loss in enumerate(losses):
                    (g,) = torch.autograd.grad(loss, param, retain_graph=i + 1 < len(losses))
                    grads[rows.start + i] = g.reshape(-1).to(out_dtype)
    finally:
        param.requires_grad_(was_trainable)
    return grads
