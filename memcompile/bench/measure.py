"""What a training step costs: wall time, device memory, and bytes of activations saved for backward."""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Iterable, Iterator

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed(device: torch.device, out: list[float]) -> Iterator[None]:
    """Appends the wall time of the block to ``out``, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    yield
    synchronize(device)
    out.append(time.perf_counter() - start)


def median(values: Iterable[float]) -> float:
    return statistics.median(values)


def storage_key(t: torch.Tensor) -> tuple:
    return t.device, t.untyped_storage().data_ptr()


def checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Layers that Hugging Face gradient checkpointing runs under ``torch.utils.checkpoint``."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def saved_bytes(run: Callable[[], object], exclude: Iterable[torch.Tensor],
                checkpointed: Iterable[torch.nn.Module] = ()) -> int:
    """Bytes of the unique storages kept for backward while ``run()`` executes.

    Counted: what autograd packs (``saved_tensors_hooks``), and the inputs of each layer in
    ``checkpointed``, which its checkpoint keeps instead of packing anything (the checkpoint's own
    hooks shadow ours inside it). Storages of ``exclude`` (parameters, buffers, the batch) are left
    out: the caller holds them anyway, as ``memcompile.report()`` leaves out graph inputs.
    """
    skip = {storage_key(t) for t in exclude}
    seen: set = set()
    total = 0

    def count(t: torch.Tensor) -> None:
        nonlocal total
        key = storage_key(t)
        if key not in skip and key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        count(t)
        return t

    def layer_inputs(module, args, kwargs) -> None:
        for value in (*args, *kwargs.values()):
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor):
                    count(t)

    handles = [m.register_forward_pre_hook(layer_inputs, with_kwargs=True) for m in checkpointed]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run()
        del out  # frees the graph and what it saved
    finally:
        for h in handles:
            h.remove()
    return total


def memtrain_saved_bytes(first: int, last: int) -> tuple[int, int | None] | None:
    """Saved-activation bytes of the training graphs memtrain compiled (reports ``first:last``):
    ``(with the passes, without them)``, summed over graphs; ``None`` when none was compiled."""
    import memcompile

    graphs = [r for r in memcompile.reports()[first:last] if not r.inference]
    if not graphs:
        return None
    after = sum(r.bytes_after for r in graphs)
    befores = [r.bytes_before for r in graphs]
    return after, None if None in befores else sum(befores)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def allocated_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.memory_allocated(device) / 2**30


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError))
