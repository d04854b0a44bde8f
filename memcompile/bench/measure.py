"""What a training step costs: wall time, device memory, and bytes of activations saved for backward."""
from __future__ import annotations

import contextlib
import linecache
import os
import statistics
import time
import weakref
from typing import Callable, Iterable, Iterator

import torch

from memcompile._torch_compat import TorchDispatchMode, memory_trace, record_memory_history, tree_leaves

GIB = 2**30


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
    """What identifies ``t``'s storage: its address, or on the meta device (where every address is 0)
    the storage object, which lives as long as the storage does."""
    storage = t.untyped_storage()
    if t.device.type == "meta":
        return t.device, id(storage)
    return t.device, storage.data_ptr()


def checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Layers that Hugging Face gradient checkpointing runs under ``torch.utils.checkpoint``."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def saved_bytes(run: Callable[[], object], exclude: Iterable[torch.Tensor],
                checkpointed: Iterable[torch.nn.Module] = (), then: Callable[[object], object] | None = None,
                device: str | None = None) -> int:
    """Bytes of the unique storages kept for backward while ``run()`` executes.

    Counted: what autograd packs (``saved_tensors_hooks``), and the inputs of each layer in
    ``checkpointed``, which its checkpoint keeps instead of packing anything (the checkpoint's own
    hooks shadow ours inside it). Storages of ``exclude`` (parameters, buffers, the batch) are left
    out: the caller holds them anyway, as ``memcompile.report()`` leaves out graph inputs.
    ``then(out)`` runs after the hooks are removed, before the graph is freed (e.g. the backward).
    ``device``: count only tensors on this device type (None: every tensor).
    """
    skip = {storage_key(t) for t in exclude}
    # Keys cannot be reused while counting: what is counted stays alive until the backward (the graph,
    # or a checkpoint, holds it).
    seen: set = set()
    total = 0

    def count(t: torch.Tensor) -> None:
        nonlocal total
        key = storage_key(t)
        if key not in skip and key not in seen and (device is None or t.device.type == device):
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
        if then is not None:
            then(out)
        del out  # frees the graph and what it saved
    finally:
        for h in handles:
            h.remove()
    return total


def memtrain_saved_bytes() -> tuple[int, int | None] | None:
    """Saved-activation bytes of the latest training step's memtrain graphs, ``(with the passes,
    without them)``, each graph weighed by its runs in the step (``memcompile.report()``); ``None``
    when no training graph ran."""
    import memcompile

    rep = memcompile.report()
    if rep is None or rep.inference or not rep.graphs:
        return None
    return rep.bytes_after, rep.bytes_before


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


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops create inside the block, live now and at most (``now``, ``peak``).

    A storage counts from the op that creates it until it is freed; views, in-place results and storages
    that existed before the block (parameters, inputs) count nothing. On the meta device this is the
    memory a run would allocate, without allocating it. Compiled code is counted op by op while it runs
    (``ignore_compile_internals``: the mode is off while torch.compile traces, on while its graphs run),
    so graphs run in Python (``aot_eager``) are counted as they execute; Inductor's fused kernels would
    allocate less.
    """

    def __init__(self, existing: Iterable[torch.Tensor] = (), describe: bool = False, device: str | None = None):
        super().__init__()
        self.device = device  # count only storages on this device type (None: all)
        self.now = self.peak = 0
        self._known = {storage_key(t) for t in existing}
        self._live: dict[tuple, weakref.finalize] = {}
        # describe=True: what was live at the peak, as (op, shape, dtype, bytes) per storage.
        self.describe = describe
        self.at_peak: list[tuple[str, tuple, str, int]] = []
        self._what: dict[tuple, tuple[str, tuple, str, int]] = {}
        self._op = ""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def _add(self, t: torch.Tensor) -> None:
        key = storage_key(t)
        if key in self._known or key in self._live or (self.device is not None and t.device.type != self.device):
            return
        storage = t.untyped_storage()
        n = storage.nbytes()
        self.now += n
        self._live[key] = weakref.finalize(storage, self._free, key, n)
        if self.describe:
            self._what[key] = (self._op, tuple(t.shape), str(t.dtype).removeprefix("torch."), n)
        if self.now > self.peak:
            self.peak = self.now
            if self.describe:
                self.at_peak = [self._what[k] for k in self._live]

    def _free(self, key: tuple, n: int) -> None:
        self.now -= n
        self._live.pop(key, None)
        self._what.pop(key, None)

    def peak_breakdown(self, top: int = 5) -> list[tuple[str, tuple, str, int, int]]:
        """The largest groups live at the peak: ``(op, shape, dtype, count, bytes)``, largest first."""
        groups: dict[tuple, list[int]] = {}
        for op, shape, dtype, n in self.at_peak:
            g = groups.setdefault((op, shape, dtype), [0, 0])
            g[0] += 1
            g[1] += n
        rows = [(*k, c, b) for k, (c, b) in groups.items()]
        return sorted(rows, key=lambda r: -r[4])[:top]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._op = func.name()
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out

    def __exit__(self, *exc):
        # Storages still live are no longer tracked: their later frees must not touch these counts.
        for fin in self._live.values():
            fin.detach()
        self._live.clear()
        return super().__exit__(*exc)


def profile(run: Callable[[], object], device: torch.device, path: str,
            rows: int = 30) -> tuple[list[dict], float, list[dict]]:
    """Run ``run`` once under ``torch.profiler``; write the ops taking the most device time (CPU time
    without a GPU) as a table to ``path``, then on a GPU those taking the most host time (where a
    host-bound step goes: launches, the CUDA runtime's calls, a synchronisation or an allocation that
    waits). Returns the top ``rows`` as ``{op, self_ms, calls}``, the milliseconds the device was busy
    (the union of its kernels' and copies' spans, so streams that run side by side count once; without
    a GPU, every op's own CPU time): against the step's wall time it says whether the step waits on the
    device or on the host; and the top ``rows`` by host time (empty without a GPU)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    with torch_profile(activities=activities) as prof:
        run()
        synchronize(device)
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(events.table(sort_by=key, row_limit=rows) + "\n")
        if cuda:
            f.write("\nby host time:\n" + events.table(sort_by="self_cpu_time_total", row_limit=rows) + "\n")
    # An op's own device time includes the kernels it launched, which are rows of their own too: the
    # ranking shows both, the busy time counts the device's events alone.
    ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)
    if cuda:
        busy_ms = busy_union([(e.time_range.start, e.time_range.end) for e in prof.events()
                              if e.device_type == DeviceType.CUDA and not e.is_user_annotation]) / 1e3
    else:
        busy_ms = sum(e.self_cpu_time_total for e in events) / 1e3
    top = [{"op": e.key, "self_ms": round(getattr(e, key) / 1e3, 3), "calls": e.count} for e in ranked[:rows]]
    host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows] if cuda else []
    host_top = [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 3), "calls": e.count} for e in host]
    return top, round(busy_ms, 3), host_top


def busy_union(spans: list[tuple[float, float]]) -> float:
    """The length of the union of ``(start, end)`` spans: time with at least one of them running."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def peak_breakdown(run: Callable[[], object], device: torch.device, path: str, rows: int = 12) -> dict | None:
    """Run ``run`` once with the CUDA allocator's history on, and write what is allocated at the step's
    peak to ``path``: each allocation site (the first frame outside torch: a line of Inductor's generated
    code, of the model, of memcompile) with the sizes it holds there. Returns the traced peak, the bytes
    held before the step, and the top ``rows`` sites; ``None`` without a GPU (the allocator records
    nothing there)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    record_memory_history(True)
    try:
        run()
        synchronize(device)
        events = memory_trace(device)
    finally:
        record_memory_history(False)
    peak, live = replay_peak(events)
    sites = live_sites(live)
    with open(path, "w") as f:
        f.write(f"allocated before the step: {before / GIB:.3f} GiB; traced peak: {(before + peak) / GIB:.3f} GiB "
                f"({peak / GIB:.3f} GiB above it, {len(live)} blocks allocated in the step and live there)\n\n")
        f.write(f"{'GiB':>8}  {'count':>5}  {'each':>12}  site\n")
        for s in sites:
            f.write(f"{s['bytes'] / GIB:8.3f}  {s['count']:5d}  {s['size']:12d}  {s['site']}\n")
    return dict(peak_traced_gib=round((before + peak) / GIB, 3), peak_base_gib=round(before / GIB, 3),
                peak_sites=sites[:rows])


def replay_peak(events: list[dict]) -> tuple[int, list[dict]]:
    """Replay the allocator's events: the highest allocated bytes reached, relative to the start (a
    block allocated before the trace and freed in it counts down), and the blocks allocated in the
    trace that are live at that moment. The allocated count drops when a block is freed
    (``free_requested``), as ``torch.cuda.max_memory_allocated`` does."""
    current = best = 0
    best_index = -1
    for i, e in enumerate(events):
        if e.get("action") == "alloc":
            current += e["size"]
            if current > best:
                best, best_index = current, i
        elif e.get("action") == "free_requested":
            current -= e["size"]
    live: dict[int, dict] = {}
    for e in events[:best_index + 1]:
        if e.get("action") == "alloc":
            live[e["addr"]] = e
        elif e.get("action") == "free_requested":
            live.pop(e["addr"], None)
    return best, list(live.values())


def live_sites(blocks: list[dict]) -> list[dict]:
    """``blocks`` grouped by allocation site and size, most bytes first."""
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    groups: dict[tuple[str, int], int] = {}
    for b in blocks:
        frame = next((f for f in b.get("frames", ()) if not f["filename"].startswith(torch_dir)
                      and not f["filename"].startswith("<")), None)
        if frame is None:
            site = "torch internals"
        else:
            text = linecache.getline(frame["filename"], frame["line"]).strip()
            site = f"{os.path.basename(frame['filename'])}:{frame['line']} {frame['name']}"
            site += f": {text}" if text else ""
        groups[(site, b["size"])] = groups.get((site, b["size"]), 0) + 1
    out = [dict(site=site, size=size, count=n, bytes=size * n) for (site, size), n in groups.items()]
    return sorted(out, key=lambda s: -s["bytes"])
