"""``memtrain::offload``/``offload_wait`` and ``memtrain::reload``/``reload_wait``: a saved activation
kept in host memory between the forward and the backward, its copies overlapped with compute.

A memory planner inserts, in the forward, ``h = offload(x)`` right after ``x`` is made and
``offload_wait(h, x)`` some ops later; in the backward, ``y = reload(h, device)`` some ops before the
first use of ``x`` and ``reload_wait(y)`` right before it. The partitioner's graph then saves ``h``, a
CPU tensor, so ``x``'s device memory is freed after the wait.

On CUDA each copy runs on a side stream per device (pinned host memory, PyTorch's caching host
allocator pools the blocks), and the ops between a start and its wait run beside it. The wait makes
the compute stream wait for the copy's event; until then:

* ``offload_wait`` takes ``x`` as an input so that ``x`` stays allocated up to it: Inductor reuses a
  graph's buffers after their last use without the caching allocator, and ``record_stream`` does not
  cover that, so nothing may write ``x``'s memory before the copy has read it;
* ``reload``'s result is allocated on the compute stream and written on the side stream: its values
  are there only after ``reload_wait``.

The waits are declared to mutate the copy they complete (``h``, ``y``), which is what they do to a
reader on the compute stream: dead-code elimination keeps them, and Inductor orders the copy's readers
after them. On CPU every op is a plain copy or nothing, so a rewritten graph runs, exactly, without a
GPU. ``offload`` and ``reload`` are functional (new contiguous tensors, never an alias of an input).

torch 2.13 has ops of the same shape (``torch._functorch._activation_offloading.offload_ops``: a start
and a ``wait_tensor`` keyed by the result, one transfer stream); torch 2.11, the oldest supported
version, has none, so these are memtrain's own on every version.
"""
from __future__ import annotations

import threading

import torch

_lock = threading.Lock()  # the backward runs on autograd's device threads, the forward on the caller's
_side_streams: dict[int, torch.cuda.Stream] = {}
# Storage address of each copy's destination (host or device) -> the event its copy records.
_pending: dict[tuple[str, int], torch.cuda.Event] = {}


def _side_stream(index: int) -> torch.cuda.Stream:
    with _lock:
        stream = _side_streams.get(index)
        if stream is None:
            stream = _side_streams[index] = torch.cuda.Stream(device=index)
        return stream


def _key(t: torch.Tensor) -> tuple[str, int]:
    return t.device.type, t.untyped_storage().data_ptr()


def _copy_on_side_stream(dst: torch.Tensor, src: torch.Tensor, device: torch.device) -> None:
    """``dst.copy_(src)`` on the side stream, after the work queued so far on the compute stream (which
    made ``src``, or last used ``dst``'s memory); its event is kept for the wait."""
    current = torch.cuda.current_stream(device)
    side = _side_stream(device.index)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        dst.copy_(src, non_blocking=True)
        event = torch.cuda.Event()
        event.record(side)
    with _lock:
        # A finished copy needs no wait: dropping those bounds the registry when a wait never runs. A
        # stale key cannot alias a live copy: an allocator reuses a block only once the copies that
        # touched it are done (the host allocator by their events, the device one by the waits).
        for key in [k for k, e in _pending.items() if e.query()]:
            del _pending[key]
        _pending[_key(dst)] = event


def _wait(t: torch.Tensor, device: torch.device) -> None:
    """``device``'s compute stream waits for the copy into ``t``, if one is pending."""
    with _lock:
        event = _pending.pop(_key(t), None)
    if event is not None:
        torch.cuda.current_stream(device).wait_event(event)


def _cuda_index(device: torch.device) -> torch.device:
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


@torch.library.custom_op("memtrain::offload", mutates_args=())
def offload(x: torch.Tensor) -> torch.Tensor:
    """``x``'s values in a new contiguous CPU tensor. On CUDA: pinned, filled asynchronously; read it,
    or free ``x``, only after ``offload_wait(h, x)``."""
    if x.device.type != "cuda":
        return x.to("cpu", memory_format=torch.contiguous_format, copy=True)
    h = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
    if x.numel():
        _copy_on_side_stream(h, x, _cuda_index(x.device))
    return h


@offload.register_fake
def _(x):
    # Also the Meta kernel: a meta x gives an empty CPU tensor, like the op's every other result.
    return torch.empty(x.shape, dtype=x.dtype, device="cpu")


@torch.library.custom_op("memtrain::offload_wait", mutates_args=("h",))
def offload_wait(h: torch.Tensor, x: torch.Tensor) -> None:
    """The compute stream waits for ``offload(x)``'s copy into ``h``; ``x`` may be freed after this."""
    if x.device.type == "cuda":
        _wait(h, x.device)


@offload_wait.register_fake
def _(h, x):
    return None


@torch.library.custom_op("memtrain::reload", mutates_args=())
def reload(h: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A new contiguous copy of ``h`` on ``device``. On CUDA, filled asynchronously: read it only after
    ``reload_wait``."""
    device = torch.device(device)
    if device.type == "meta":
        return torch.empty(h.shape, dtype=h.dtype, device=device)
    if device.type != "cuda":
        return h.to(device, memory_format=torch.contiguous_format, copy=True)  # never an alias of h
    device = _cuda_index(device)
    y = torch.empty(h.shape, dtype=h.dtype, device=device)
    if h.numel():
        _wait(h, device)  # an offload whose wait did not run (its copy is on the same side stream anyway)
        _copy_on_side_stream(y, h, device)
    return y


@reload.register_fake
def _(h, device):
    return torch.empty(h.shape, dtype=h.dtype, device=device)


@torch.library.custom_op("memtrain::reload_wait", mutates_args=("y",))
def reload_wait(y: torch.Tensor) -> None:
    """The compute stream waits for ``reload``'s copy into ``y``."""
    if y.device.type == "cuda":
        _wait(y, y.device)


@reload_wait.register_fake
def _(y):
    return None
