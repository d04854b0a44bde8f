"""State that activation compression keeps across training steps, and the two ops that read it.

VeLoRA's vector ``v`` is estimated on the first training batch and then frozen; CompAct's seed moves
to a new projection every ``refresh`` steps. Both must persist between calls of a compiled graph
without becoming graph inputs the user would have to pass, so they live here, keyed by the name of
the layer (group) they belong to, and are read by two opaque custom ops. The keys are stable across
recompiles, and ``state_dict()``/``load_state_dict()`` carry them through checkpoints.
"""
from __future__ import annotations

import threading
import zlib

import torch

_LOCK = threading.Lock()
_VELORA_V: dict[str, torch.Tensor] = {}
_COMPACT_CALLS: dict[str, int] = {}


def state_dict() -> dict:
    """The VeLoRA vectors and CompAct step counters, to save with a training checkpoint."""
    with _LOCK:
        return {"velora_v": {k: v.detach().cpu().clone() for k, v in _VELORA_V.items()},
                "compact_calls": dict(_COMPACT_CALLS)}


def load_state_dict(state: dict) -> None:
    """Restore what ``state_dict()`` returned, so a resumed run uses the same ``v`` and seeds."""
    with _LOCK:
        _VELORA_V.clear()
        _VELORA_V.update({k: v.clone() for k, v in state.get("velora_v", {}).items()})
        _COMPACT_CALLS.clear()
        _COMPACT_CALLS.update(state.get("compact_calls", {}))


def reset() -> None:
    """Forget all state: the next training step re-initialises VeLoRA's vectors."""
    load_state_dict({})


def velora_vectors() -> dict[str, torch.Tensor]:
    with _LOCK:
        return dict(_VELORA_V)


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
def velora_vector(x: torch.Tensor, num_groups: int, key: str, once: bool) -> torch.Tensor:
    """VeLoRA's ``v`` for layer group ``key`` (shape ``[ceil(D/G)]``, fp32).

    With ``once`` (``batch_average_once``) the first call computes it from ``x`` and later calls
    return the stored one; otherwise it is re-estimated from every batch.
    """
    with _LOCK:
        v = _VELORA_V.get(key) if once else None
        if v is None:
            v = batch_average_vector(x.detach(), num_groups)
            _VELORA_V[key] = v
        elif v.device != x.device:
            v = _VELORA_V[key] = v.to(x.device)
    return v.clone()


@velora_vector.register_fake
def _(x, num_groups, key, once):
    return x.new_empty(-(-x.shape[-1] // num_groups), dtype=torch.float32)


def layer_seed(key: str, base_seed: int) -> int:
    """A per-layer seed: stable across runs (crc32, not Python's salted hash)."""
    return (zlib.crc32(key.encode()) + 1_000_003 * base_seed) % (2**31 - 1)


@torch.library.custom_op("memtrain::compact_seed", mutates_args=())
def compact_seed(x: torch.Tensor, key: str, base_seed: int, refresh: int) -> torch.Tensor:
    """CompAct's seed for ``key`` at this step (0-d int64 on CPU); counts one step per call.

    ``x`` only orders the call inside the forward. The seed is saved for the backward, so the backward
    regenerates the very ``P`` its forward used even if another forward ran in between.
    """
    with _LOCK:
        calls = _COMPACT_CALLS.get(key, 0)
        _COMPACT_CALLS[key] = calls + 1
    return torch.tensor(layer_seed(key, base_seed) + calls // refresh, dtype=torch.int64)


@compact_seed.register_fake
def _(x, key, base_seed, refresh):
    return torch.empty((), dtype=torch.int64)
