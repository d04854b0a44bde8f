"""State that activation compression keeps across training steps, and the two ops that read it.

VeLoRA's vector ``v`` is estimated on the first training batch and then frozen; CompAct's seed moves
to a new projection every ``refresh`` steps. The state belongs to the layer whose input is
compressed: it lives on that layer's weight parameter (the first weight of a group that shares one
input), which the ops receive as an input at run time. So it follows the model rather than the
compiled graph: one compiled decoder block that serves every layer (regional compilation) keeps
each layer's own ``v`` and step counter, two models with the same module names keep theirs, and a
``.to()`` moves ``v`` with the next call. Checkpoint it with ``state_dict(model)`` /
``load_state_dict(model, state)``, keyed by the model's parameter names.

Under FSDP2 (``fully_shard``) the forward receives the module's unsharded parameters, which FSDP2
creates at the first all-gather and keeps for the rest of training (their storage is freed between
uses, the objects stay): the state lives on those, one per process. ``state_dict``/``load_state_dict``
/``reset``/``velora_vectors`` reach them through ``FSDPModule.unshard()``, so with FSDP2 they are
collective: call them on every process. Each process keeps its own state (VeLoRA's ``v`` is
estimated from the process's own batch): save it per process.

The graph nodes of these ops are never recomputed (the pass marks them must-save): recomputing them
in the backward would count a step twice or re-estimate ``v`` from another batch.
"""
from __future__ import annotations

import sys
import threading
import warnings
import weakref
import zlib
from dataclasses import dataclass

import torch

_LOCK = threading.Lock()
_ATTR = "_memtrain_activation_state"
# Owners (weight parameters) that hold state, by id; weak, so state dies with its model.
_OWNERS: dict[int, weakref.ref] = {}
# How many blocks have drawn a CompAct seed for each (name inside the block, base seed), when one
# compiled block serves them all.
_SEEDS_DRAWN: dict[tuple[str, int], int] = {}


@dataclass
class LayerState:
    """One layer group's compression state."""

    velora_v: torch.Tensor | None = None  # [ceil(D/G)] fp32, unit norm; None until estimated
    compact_seed: int | None = None  # this layer's base seed; None until the first step
    compact_calls: int = 0  # forward calls so far (CompAct refreshes P every `refresh` calls)

    def to_dict(self) -> dict:
        return {"velora_v": None if self.velora_v is None else self.velora_v.detach().cpu().clone(),
                "compact_seed": self.compact_seed, "compact_calls": self.compact_calls}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerState":
        v = d.get("velora_v")
        return cls(None if v is None else v.clone(), d.get("compact_seed"), int(d.get("compact_calls", 0)))


def _state_of(owner: torch.Tensor, create: bool = True) -> LayerState | None:
    state = owner.__dict__.get(_ATTR)
    if state is None and create:
        state = LayerState()
        setattr(owner, _ATTR, state)
        key = id(owner)
        _OWNERS[key] = weakref.ref(owner, lambda _, key=key: _OWNERS.pop(key, None))
    return state


def forward_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s parameters by name, as the compiled forward receives them: for a parameter that FSDP2
    shards, its unsharded parameter (all-gathered here, one FSDP module at a time, then resharded;
    collective). What the backend leaves on parameters (this state, ``memcompile.marks``) is there."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: no module of the model can be FSDP's
    modules = [m for m in model.modules() if isinstance(m, fsdp.FSDPModule)] if fsdp is not None else []
    owners = dict(model.named_parameters(remove_duplicate=False))
    for module in modules:
        module.unshard()
        try:
            # The parameters ``module`` manages are now plain (unsharded) tensors, the others DTensors.
            for name, p in model.named_parameters(remove_duplicate=False):
                if not isinstance(p, torch.distributed.tensor.DTensor):
                    owners[name] = p
        finally:
            module.reshard()
    return owners


def state_dict(model: torch.nn.Module) -> dict[str, dict]:
    """The VeLoRA vectors and CompAct seeds/counters of ``model``'s layers, by parameter name, to save
    with a training checkpoint."""
    owners = forward_parameters(model)
    with _LOCK:
        return {name: state.to_dict() for name, p in owners.items()
                if (state := _state_of(p, create=False)) is not None}


def load_state_dict(model: torch.nn.Module, state: dict[str, dict]) -> None:
    """Restore what ``state_dict(model)`` returned, so a resumed run uses the same ``v`` and seeds.
    Layers absent from ``state`` start afresh; names ``model`` lacks are an error."""
    params = forward_parameters(model)
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise KeyError(f"activation state for parameters the model does not have: {unknown[:5]}")
    with _LOCK:
        for name, p in params.items():
            if name in state:
                fresh = LayerState.from_dict(state[name])
                _state_of(p).__dict__.update(fresh.__dict__)
            elif _state_of(p, create=False) is not None:
                setattr(p, _ATTR, LayerState())


def reset(model: torch.nn.Module | None = None) -> None:
    """Forget the state of ``model``'s layers (every model's, without one): the next training step
    re-estimates VeLoRA's vectors and restarts CompAct's counters."""
    params = None if model is None else forward_parameters(model)
    with _LOCK:
        if params is not None:
            owners = [p for p in params.values() if _state_of(p, create=False) is not None]
        else:
            owners = [o for ref in list(_OWNERS.values()) if (o := ref()) is not None]
            _SEEDS_DRAWN.clear()
        for p in owners:
            p.__dict__.pop(_ATTR, None)
            _OWNERS.pop(id(p), None)


def velora_vectors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each compressed layer group's estimated ``v``, by the name of the weight that owns it."""
    owners = forward_parameters(model)
    with _LOCK:
        return {name: s.velora_v for name, p in owners.items()
                if (s := _state_of(p, create=False)) is not None and s.velora_v is not None}


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
    with _LOCK:
        state = _state_of(owner)
        v = state.velora_v if once else None
        if v is None:
            v = batch_average_vector(x.detach(), num_groups)
            if bool(torch.isfinite(v).all()):
                state.velora_v = v
            elif once:
                warnings.warn(f"memtrain: VeLoRA's vector for {key} was estimated from a batch with NaN or "
                              "inf values; it is estimated again from the next finite batch", stacklevel=2)
        elif v.device != x.device:
            v = state.velora_v = v.to(x.device)
    return v.clone()


@velora_vector.register_fake
def _(x, owner, num_groups, key, once):
    return x.new_empty(-(-x.shape[-1] // num_groups), dtype=torch.float32)


def split_layer(key: str) -> tuple[str, int | None]:
    """``"model.layers.3.mlp.down_proj"`` -> ``("mlp.down_proj", 3)``: the name inside a repeated block
    and the block's index (the first numeric segment); ``(key, None)`` without one."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i + 1:]), int(part)
    return key, None


def layer_seed(name: str, base_seed: int, layer: int) -> int:
    """The base seed of layer group ``name`` (its name inside the block) in block ``layer``: stable
    across runs (crc32, not Python's salted hash), and the same whether the model is compiled whole or
    block by block."""
    return (zlib.crc32(name.encode()) + 1_000_003 * base_seed + 7_919 * layer) % (2**31 - 1)


@torch.library.custom_op("memtrain::compact_seed", mutates_args=())
def compact_seed(x: torch.Tensor, owner: torch.Tensor, name: str, layer: int, base_seed: int,
                 refresh: int) -> torch.Tensor:
    """CompAct's seed for the layer group whose first weight is ``owner``, at this step (0-d int64 on
    CPU); counts one step per call.

    ``name`` is the group's name inside its block and ``layer`` the block's index. One compiled block
    that serves every layer cannot know the index, and passes -1: the layers then count in the order
    they first run (0, 1, 2, ... for a decoder), which is the index the whole-model compile reads from
    the names. ``x`` only orders the call inside the forward. The seed is saved for the backward, so
    the backward regenerates the very ``P`` its forward used even if another forward ran in between.
    """
    with _LOCK:
        state = _state_of(owner)
        if state.compact_seed is None:
            if layer < 0:
                layer = _SEEDS_DRAWN.get((name, base_seed), 0)
                _SEEDS_DRAWN[(name, base_seed)] = layer + 1
            state.compact_seed = layer_seed(name, base_seed, layer)
        calls = state.compact_calls
        state.compact_calls = calls + 1
        seed = state.compact_seed
    return torch.tensor(seed + calls // refresh, dtype=torch.int64)


@compact_seed.register_fake
def _(x, owner, name, layer, base_seed, refresh):
    return torch.empty((), dtype=torch.int64)

