"""VeLoRA: rank-1 projection of each sub-token of a saved linear input.

The forward cuts each token ``x`` (width ``D``) into ``G`` sub-tokens of width ``m = ceil(D/G)`` and
saves one scalar per sub-token, ``z = group(x) @ v`` (``N x G``), with ``v`` the layer's unit-norm
vector. The backward evaluates the weight gradient ``grad_W = grad_out^T @ x_hat`` with
``x_hat = ungroup(z v^T) * scale`` in the compressed space: ``grad_W = ((grad_out^T z) ⊗ v) * scale``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from memcompile import _options, activation_state
from memcompile._warn import warn

from .method import DEFAULT_EXCLUDE, Compression, CompressionMethod, Group, register

NAME = "velora"
# Its papers compress the LoRA A inputs when adapters are present and the value and down
# projections in full training (GPT-2 and OPT spell the down projection ``mlp.c_proj`` and ``fc2``).
TARGETS = ("lora_A", "v_proj", "down_proj", "mlp.c_proj", "fc2")


@dataclass(frozen=True)
class VeLoRAConfig:
    """VeLoRA: rank-1 projection of each sub-token of a saved linear input.

    Args:
        num_groups: sub-tokens per token (the feature dim is cut into this many slices). The paper's
            scripts use 32 for Llama-7B; a width not divisible by it is zero-padded, as PEFT does.
        scale: multiplies the reconstructed input (``velora_scale``: 0.1 for Alpaca, 1.0 for C4).
        init: ``"batch_average_once"`` (the paper's code: v = normalised mean sub-token of the first
            training batch, then frozen) or ``"batch_average"`` (re-estimated every batch).
    """

    num_groups: int = 32
    scale: float = 1.0
    init: str = "batch_average_once"

    def __post_init__(self):
        _options.int_at_least("velora.num_groups", self.num_groups, 1)
        _options.positive_float("velora.scale", self.scale)
        _options.choice("velora.init", self.init, ("batch_average_once", "batch_average"))


# [ceil(D/G)] fp32, unit norm; None until estimated
activation_state.register_state({"velora_v": None})


def vectors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each compressed layer group's estimated ``v``, by the name of the weight that owns it."""
    return activation_state.field_of(model, "velora_v")


def group_subtokens(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``(N, D) -> (N * G, ceil(D / G))``: contiguous slices of the feature dim, zero-padded as PEFT does."""
    n, d = x.shape
    m = -(-d // num_groups)
    if m * num_groups != d:
        x = torch.nn.functional.pad(x, (0, m * num_groups - d))
    return x.reshape(n * num_groups, m)


def batch_average_vector(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """VeLoRA's initialisation: the unit-norm mean sub-token of the batch, in fp32."""
    mean = group_subtokens(x, num_groups).float().mean(0)
    return mean / mean.norm().clamp_min(1e-12)


@torch.library.custom_op("memtrain::velora_vector", mutates_args=())
def velora_vector(x: torch.Tensor, owner: torch.Tensor, num_groups: int, key: str, once: bool) -> torch.Tensor:
    """VeLoRA's ``v`` for the layer group whose first weight is ``owner`` (shape ``[ceil(D/G)]``, fp32).

    With ``once`` (``batch_average_once``) the first call with finite ``x`` computes it and later calls
    return the stored one; otherwise it is re-estimated from every batch. A batch with NaN or inf
    gives a non-finite ``v`` that is used for that batch only (its gradients are not finite anyway,
    as in eager) and not kept, so the next finite batch estimates it.
    """
    with activation_state.LOCK:
        state = activation_state.state_of(owner)
        v = state.velora_v if once else None
        if v is None:
            v = batch_average_vector(x.detach(), num_groups)
            if bool(torch.isfinite(v).all()):
                state.velora_v = v
            elif once:
                warn(f"memtrain: VeLoRA's vector for {key} was estimated from a batch with NaN or "
                     "inf values; it is estimated again from the next finite batch")
        elif v.device != x.device:
            v = state.velora_v = v.to(x.device)
    return v.clone()


@velora_vector.register_fake
def _(x, owner, num_groups, key, once):
    return x.new_empty(-(-x.shape[-1] // num_groups), dtype=torch.float32)


def check(config: VeLoRAConfig, width: int) -> str | None:
    if config.num_groups > width:
        return f"num_groups {config.num_groups} > input width {width}"
    return None


def project(x, owner, *, num_groups: int, key: str, once: bool):
    """``(N, D) -> z (N, G)`` and ``v``; ``owner`` is the group's first weight, which holds ``v``."""
    d = x.shape[1]
    m = -(-d // num_groups)
    v = torch.ops.memtrain.velora_vector(x, owner, num_groups, key, once)
    if m * num_groups != d:
        x = torch.nn.functional.pad(x, (0, m * num_groups - d))
    # -1, not N: the token count may be symbolic (dynamic shapes); the width never is
    z = torch.mv(x.reshape(-1, m), v.to(x.dtype)).reshape(-1, num_groups)
    return z, v


def weight_grad(gt, z, v, *, width: int, num_groups: int, scale: float):
    """``(O, N), (N, G), (m,) -> (O, D)``: ``g^T x_hat`` for an ``nn.Linear``."""
    m = v.shape[0]
    p = torch.mm(gt, z).float()
    w = (p.unsqueeze(-1) * v.view(1, 1, m)).reshape(p.shape[0], num_groups * m)[:, :width]
    return (w * scale).to(gt.dtype)


def weight_grad_conv1d(gr, z, v, *, width: int, num_groups: int, scale: float):
    """``(N, O), (N, G), (m,) -> (D, O)``: ``x_hat^T g`` for GPT-2's ``Conv1D``."""
    m = v.shape[0]
    p = torch.mm(z.t(), gr).float()
    w = (v.view(1, m, 1) * p.unsqueeze(1)).reshape(num_groups * m, p.shape[1])[:width]
    return (w * scale).to(gr.dtype)


def plan(config: VeLoRAConfig, group: Group) -> Compression:
    g = config.num_groups
    grad = {"width": group.width, "num_groups": g, "scale": float(config.scale)}
    return Compression(
        project=functools.partial(project, num_groups=g, key=group.key, once=config.init == "batch_average_once"),
        weight_grad=functools.partial(weight_grad, **grad),
        weight_grad_conv1d=functools.partial(weight_grad_conv1d, **grad),
        width=g, state_bytes=4 * -(-group.width // g))  # v: m fp32 values


METHOD = register(CompressionMethod(
    NAME, VeLoRAConfig, TARGETS, DEFAULT_EXCLUDE, check, plan, torch.ops.memtrain.velora_vector.default,
    cli=(("groups", "num_groups"),), module=__name__))
