"""Selection features from per-example gradients: Adam normalisation, then top-k sparsification.

Adam normalisation uses the selector's own history (not the optimizer's state), as CoLM does: for
each example ``m_i = b1 m + (1 - b1) g_i``, ``v_i = b2 v + (1 - b2) g_i^2``, bias-corrected with the
history's step ``t + 1``, feature ``m_hat_i / (sqrt(v_hat_i) + eps)``. After selection the history
becomes the mean of ``m_i, v_i`` over the selected examples.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


class AdamHistory:
    """First and second moments of the selected examples' gradients, across selection steps."""

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.betas = betas
        self.eps = eps
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.step = 0

    def _moments(self, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b1, b2 = self.betas
        m = (1 - b1) * grads
        v = (1 - b2) * grads.square()
        if self.m is not None:
            m = m + b1 * self.m.to(grads)
            v = v + b2 * self.v.to(grads)
        return m, v

    def normalise(self, grads: torch.Tensor) -> torch.Tensor:
        """Adam-normalised features of ``(n, d)`` per-example gradients (history unchanged)."""
        b1, b2 = self.betas
        t = self.step + 1
        m, v = self._moments(grads)
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        return m_hat / (v_hat.sqrt() + self.eps)

    def update(self, selected_grads: torch.Tensor) -> None:
        """Move the history to the mean moments of the selected examples."""
        if selected_grads.shape[0] == 0:
            return
        m, v = self._moments(selected_grads)
        self.m, self.v = m.mean(dim=0), v.mean(dim=0)
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        return {"m": self.m, "v": self.v, "step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.m, self.v, self.step = state["m"], state["v"], state["step"]


def top_coordinates(features: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` coordinates (clamped to the width) with the largest ``|mean over rows|``."""
    k = min(k, features.shape[1])
    return features.mean(dim=0).abs().topk(k).indices
