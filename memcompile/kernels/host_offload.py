"""``memtrain::offload`` and ``memtrain::reload``: a saved activation kept in host memory between the
forward and the backward.

A memory planner inserts ``h = offload(x)`` right after ``x`` is produced and ``y = reload(h, device)``
before the backward's uses of ``x``; the partitioner then saves ``h``, a CPU tensor, so ``x``'s device
memory is freed after its last forward use.

On CUDA the device-to-host copy runs on a side stream per device, into pinned memory, so it overlaps
the forward's compute (see below); ``reload`` makes the current stream wait for that copy before its own
host-to-device copy. On CPU both ops are plain copies, so a rewritten graph runs, exactly, without a
GPU. Both ops are functional (new tensors out, nothing mutated): dead-code elimination may drop an
unused one, and CSE may merge two offloads of one ``x`` or two reloads of one ``h`` to one device,
which only shares a copy. ``h`` and the reloaded tensor are contiguous, whatever ``x``'s strides.

``x.record_stream`` keeps the CUDA caching allocator from handing ``x``'s memory to another tensor
before the copy ends, but Inductor's own buffer reuse within a graph (a later buffer of the same size
written into ``x``'s) bypasses the allocator; so the compute stream waits for the copy's event right
away. The copy still runs beside the host's queueing of later kernels, but not beside their execution.
"""
from __future__ import annotations

import threading

import torch

_lock = threading.Lock()  # the backward runs on autograd's device threads, the forward on the caller's
_side_streams: dict[int, torch.cuda.Stream] = {}
# Storage address of each offloaded host tensor -> the event its device-to-host copy records.
_pending: dict[int, torch.cuda.Event] = {}


def _side_stream(index: int) -> torch.cuda.Stream:
    with _lock:
        stream = _side_streams.get(index)
        if stream is None:
            stream = _side_streams[index] = torch.cuda.Stream(device=index)
        return stream


def _register(h: torch.Tensor, event: torch.cuda.Event) -> None:
    with _lock:
        # A finished copy needs no wait; dropping those bounds the registry when a backward never runs.
        # A stale key cannot alias a live copy: the host allocator reuses a block only after the
        # events of every copy that touched it have completed.
        for key in [k for k, e in _pending.items() if e.query()]:
            del _pending[key]
        _pending[h.untyped_storage().data_ptr()] = event


def _pop(h: torch.Tensor) -> torch.cuda.Event | None:
    with _lock:
        return _pending.pop(h.untyped_storage().data_ptr(), None)


def _offload_cuda(x: torch.Tensor) -> torch.Tensor:
    # pin_memory=True goes through PyTorch's caching host allocator, which pools pinned blocks: after
    # the first steps a block of the same size is reused, with no cudaHostAlloc per tensor.
    h = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
    if x.numel() == 0:
        return h
    side = _side_stream(x.device.index)
    side.wait_stream(torch.cuda.current_stream(x.device))  # x is complete before it is read
    with torch.cuda.stream(side):
        h.copy_(x, non_blocking=True)
        event = torch.cuda.Event()
        event.record(side)
    x.record_stream(side)  # x's memory stays allocated until the side stream is past the copy
    # Inductor reuses a graph's buffers without the allocator, so record_stream alone does not keep a
    # later kernel from writing into x's memory mid-copy: the compute stream waits for the copy. The
    # host is never blocked; the planner prices the copy in full for this reason.
    torch.cuda.current_stream(x.device).wait_event(event)
    _register(h, event)
    return h


@torch.library.custom_op("memtrain::offload", mutates_args=())
def offload(x: torch.Tensor) -> torch.Tensor:
    """``x``'s values in a new contiguous CPU tensor (pinned, filled asynchronously, on CUDA)."""
    if x.device.type == "cuda":
        return _offload_cuda(x)
    return x.to("cpu", memory_format=torch.contiguous_format, copy=True)


@offload.register_fake
def _(x):
    # Also the Meta kernel: a meta x gives an empty CPU tensor, like the op's every other result.
    return torch.empty(x.shape, dtype=x.dtype, device="cpu")


@torch.library.custom_op("memtrain::reload", mutates_args=())
def reload(h: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A new contiguous copy of ``h`` on ``device``; on CUDA, ordered after ``h``'s offload copy."""
    device = torch.device(device)
    if device.type == "meta":
        return torch.empty(h.shape, dtype=h.dtype, device=device)
    if device.type != "cuda":
        return h.to(device, memory_format=torch.contiguous_format, copy=True)  # never an alias of h
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    current = torch.cuda.current_stream(device)
    event = _pop(h)
    if event is not None:
        current.wait_event(event)
    elif device.index in _side_streams:
        # No entry: the copy finished and was pruned, or another reload of h took it (CSE left two,
        # perhaps on another stream). Waiting on the side stream's queue is correct in every case.
        current.wait_stream(_side_streams[device.index])
    return h.to(device, non_blocking=True, memory_format=torch.contiguous_format, copy=True)


@reload.register_fake
def _(h, device):
    return torch.empty(h.shape, dtype=h.dtype, device=device)
