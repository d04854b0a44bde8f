"""State that activation compression keeps across training steps, per layer.

VeLoRA's vector ``v`` is estimated on the first training batch and then frozen; CompAct's seed moves
to a new projection every ``refresh`` steps. The state belongs to the layer whose input is
compressed: it lives on that layer's weight parameter (the first weight of a group that shares one
input), which the methods' state ops receive as an input at run time. So it follows the model rather
than the compiled graph: one compiled decoder block that serves every layer (regional compilation)
keeps each layer's own ``v`` and step counter, two models with the same module names keep theirs,
and a ``.to()`` moves ``v`` with the next call. Checkpoint it with ``state_dict(model)`` /
``load_state_dict(model, state)``, keyed by the model's parameter names.

A graph that serves several blocks (``compile_blocks``) cannot know which block runs it; the block's
compiled forward says so at run time (``running_block``), for state that depends on the block's
position (CompAct's seed).

Which fields a layer's state has is up to the methods (``memcompile.passes.compression``): each
registers its own with ``register_state``; their ops read and write them under ``LOCK``.

Under FSDP2 (``fully_shard``) the forward receives the module's unsharded parameters, which FSDP2
creates at the first all-gather and keeps for the rest of training (their storage is freed between
uses, the objects stay): the state lives on those, one per process. ``state_dict``/``load_state_dict``
/``reset``/``field_of`` reach them through ``FSDPModule.unshard()``, so with FSDP2 they are
collective: call them on every process. Each process keeps its own state (VeLoRA's ``v`` is
estimated from the process's own batch): save it per process.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
import weakref
from typing import Any, Callable

import torch

LOCK = threading.Lock()
_ATTR = "_memtrain_activation_state"
# Owners (weight parameters) that hold state, by id; weak, so state dies with its model.
_OWNERS: dict[int, weakref.ref] = {}
_FIELDS: dict[str, Any] = {}  # field -> its value before the first step, from every method
_RESETS: list[Callable[[], None]] = []  # what methods keep for the whole process, to forget on reset()
_BLOCK: contextvars.ContextVar[int | None] = contextvars.ContextVar("memtrain_block", default=None)


def register_state(fields: dict[str, Any], on_reset: Callable[[], None] | None = None) -> None:
    """Add a method's fields (name -> initial value, an immutable one) to every layer's state;
    ``on_reset`` forgets what the method keeps outside the layers when every model's state is reset."""
    _FIELDS.update(fields)
    if on_reset is not None:
        _RESETS.append(on_reset)


@contextlib.contextmanager
def running_block(index: int):
    """Within it, ``block_index()`` is ``index``: the position, in its list, of the block whose compiled
    graph runs (a graph that serves every block of a list has no constant for it)."""
    token = _BLOCK.set(index)
    try:
        yield
    finally:
        _BLOCK.reset(token)


def block_index() -> int | None:
    """The position of the block now running its shared graph (``running_block``), else ``None``."""
    return _BLOCK.get()


class LayerState:
    """One layer group's compression state: an attribute per registered field."""

    def __init__(self, **values):
        self.__dict__.update(_FIELDS)
        self.__dict__.update(values)

    def to_dict(self) -> dict:
        return {k: _copy(getattr(self, k)) for k in _FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerState":
        return cls(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in d.items() if k in _FIELDS})


def _copy(value: Any) -> Any:
    return value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value


def state_of(owner: torch.Tensor, create: bool = True) -> LayerState | None:
    """The state kept on ``owner`` (created empty if it has none and ``create``); hold ``LOCK``."""
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
    """The compression state of ``model``'s layers (VeLoRA's vectors, CompAct's seeds and counters),
    by parameter name, to save with a training checkpoint."""
    owners = forward_parameters(model)
    with LOCK:
        return {name: state.to_dict() for name, p in owners.items()
                if (state := state_of(p, create=False)) is not None}


def load_state_dict(model: torch.nn.Module, state: dict[str, dict]) -> None:
    """Restore what ``state_dict(model)`` returned, so a resumed run uses the same ``v`` and seeds.
    Layers absent from ``state`` start afresh; names ``model`` lacks are an error."""
    params = forward_parameters(model)
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise KeyError(f"activation state for parameters the model does not have: {unknown[:5]}")
    with LOCK:
        for name, p in params.items():
            if name in state:
                fresh = LayerState.from_dict(state[name])
                state_of(p).__dict__.update(fresh.__dict__)
            elif state_of(p, create=False) is not None:
                setattr(p, _ATTR, LayerState())


def reset(model: torch.nn.Module | None = None) -> None:
    """Forget the state of ``model``'s layers (every model's, without one): the next training step
    re-estimates VeLoRA's vectors and restarts CompAct's counters."""
    params = None if model is None else forward_parameters(model)
    with LOCK:
        if params is not None:
            owners = [p for p in params.values() if state_of(p, create=False) is not None]
        else:
            owners = [o for ref in list(_OWNERS.values()) if (o := ref()) is not None]
            for forget in _RESETS:
                forget()
        for p in owners:
            p.__dict__.pop(_ATTR, None)
            _OWNERS.pop(id(p), None)


def field_of(model: torch.nn.Module, name: str) -> dict[str, Any]:
    """One field of every layer's state that has been set (not ``None``), by the owning weight's name."""
    owners = forward_parameters(model)
    with LOCK:
        return {pname: value for pname, p in owners.items()
                if (s := state_of(p, create=False)) is not None and (value := getattr(s, name)) is not None}
