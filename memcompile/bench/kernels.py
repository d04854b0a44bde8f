"""``kernels`` mode: every op of ``memcompile.kernels`` and ``memcompile.quant`` timed against the same op
in torch (its ``_ref``) and in bitsandbytes where it has one, side by side.

Ops are found by their reference: a public ``<op>_ref`` in a module of those packages. The
inputs and the implementations to time (the ``<op>_triton`` launcher, or the registered op where
there is no bare launcher) come from ``kernel_cases.CASES``; an op found without an entry there is
listed, not skipped silently.
"""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import tempfile

# Triton's interpreter, and memcompile's kernels launched on CPU tensors through it.
INTERPRETER_ENV = {"TRITON_INTERPRET": "1", "MEMTRAIN_TRITON_ON_CPU": "1"}
NEEDS_CUDA = ("kernels mode needs CUDA: there is no CUDA device here. --allow-cpu runs the kernels in "
              "Triton's interpreter at tiny sizes, which checks that they run; its times mean nothing.")


KERNEL_PACKAGES = ("memcompile.kernels", "memcompile.quant")


def discover() -> tuple[dict[str, str], dict[str, str]]:
    """``({op: module's full name}, {module: import error})`` over ``KERNEL_PACKAGES`` and their
    sub-packages."""
    ops, broken = {}, {}
    for pkg_name in KERNEL_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in sorted(pkgutil.walk_packages(pkg.__path__, pkg_name + "."), key=lambda m: m.name):
            short = info.name.rpartition(".")[2]
            if short.startswith("_"):
                continue
            try:
                module = importlib.import_module(info.name)
            except Exception as e:  # a kernel still being written must not stop the others
                broken[short] = f"{type(e).__name__}: {e}"[:160]
                continue
            for attr, value in vars(module).items():
                if attr.endswith("_ref") and callable(value) and getattr(value, "__module__", None) == info.name:
                    ops[attr.removesuffix("_ref")] = info.name
    return ops, broken


def _seconds(fn, device) -> float:
    """``fn``'s time a call, after its first call (``_first_call``, which compiles the Triton kernel)."""
    from torch.utils.benchmark import Timer

    timer = Timer("fn()", globals={"fn": fn})  # synchronises CUDA around the timed calls
    if device.type == "cuda":
        return timer.blocked_autorange(min_run_time=0.3).median  # ~45 rows inside the GPU check's 55 s step
    return timer.timeit(2).median  # the interpreter: a few calls say it runs, not how fast


def _host_seconds(fn, device) -> float:
    """The host's time to issue one call, the device idle before it (median of 10): what each call
    costs a step that waits on the host rather than on the GPU."""
    import statistics
    import time

    import torch

    times = []
    for _ in range(10 if device.type == "cuda" else 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return statistics.median(times)


def _first_call(fn, device) -> tuple[object, float]:
    """``fn``'s output and the seconds of its first call: the Triton kernel's compile and, for an
    autotuned kernel, the timing of each config at this size."""
    import time

    import torch

    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def _tuning(module_name: str) -> dict:
    """For each autotuned kernel of ``module_name`` that has tuned: the config it chose for the size it
    tuned last, each config's median time (ms) and the seconds the tuning took (compiles included)."""
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return {}
    out = {}
    for name, value in vars(importlib.import_module(module_name)).items():
        timings = getattr(value, "configs_timings", None) if isinstance(value, Autotuner) else None
        if timings:
            out[name] = {"best": str(value.best_config), "seconds": round(getattr(value, "bench_time", 0.0), 3),
                         "ms": {str(c): round(float(t[0] if isinstance(t, (list, tuple)) else t), 5)
                                for c, t in timings.items()}}
    return out


def _max_diff(a, b) -> float | None:
    import torch

    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return None
    return (a.float() - b.float()).abs().max().item()


def measure(device, tiny: bool) -> list[dict]:
    from memcompile.bench.kernel_cases import CASES

    ops, broken = discover()
    rows = [{"op": m, "status": f"import failed: {why}"} for m, why in broken.items()]
    for op, full_name in sorted(ops.items()):
        module = full_name.rpartition(".")[2]
        if op not in CASES:
            rows.append({"op": op, "module": module, "status": "no inputs in memcompile/bench/kernel_cases.py"})
            continue
        try:
            cases = CASES[op](device, tiny)
        except Exception as e:  # inputs for an op whose API moved: say so, time the rest
            rows.append({"op": op, "module": module, "status": f"error: {type(e).__name__}: {e}"[:200]})
            continue
        for case in cases:
            try:
                ref = case.impls["torch"]()
            except Exception:  # the torch row below reports the error
                ref = None
            torch_s = None
            timed = []
            for impl, fn in case.impls.items():
                row = {"op": op, "module": module, "size": case.size, "impl": impl}
                try:
                    out, first = _first_call(fn, device)
                    if impl == "triton":  # the bare launcher's first call at this size compiles (and tunes)
                        row.update(first_call_s=round(first, 4), tuning=_tuning(full_name))
                    row.update(status="ok", seconds=_seconds(fn, device), host_seconds=_host_seconds(fn, device),
                               max_diff=None if impl in case.differ else _max_diff(out, ref))
                except Exception as e:  # one implementation failing leaves the others' times
                    row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                if impl == "torch" and row["status"] == "ok":
                    torch_s = row["seconds"]
                timed.append(row)
            for row in timed:
                row["vs_torch"] = (round(torch_s / row["seconds"], 3)
                                   if torch_s and row.get("seconds") else None)
            rows.extend(timed)
    return rows


def _ms(s: float | None) -> str:
    return "" if s is None else f"{s * 1e3:.3f}"


def main(args) -> list[dict]:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print(NEEDS_CUDA)
        return []
    if not cuda and any(os.environ.get(k) != "1" for k in INTERPRETER_ENV):
        return _in_interpreter(args)
    device = torch.device("cuda") if cuda else torch.device("cpu")
    rows = measure(device, tiny=not cuda)
    from memcompile.bench.table import render, write_jsonl

    columns = [
        ("op", lambda r: r["op"]), ("size", lambda r: r.get("size", "")), ("impl", lambda r: r.get("impl", "")),
        ("status", lambda r: r["status"]), ("ms", lambda r: _ms(r.get("seconds"))),
        ("host µs a call", lambda r: "" if r.get("host_seconds") is None else f"{r['host_seconds'] * 1e6:.0f}"),
        ("first call s", lambda r: "" if r.get("first_call_s") is None else f"{r['first_call_s']:.3f}"),
        ("autotuned to", lambda r: "; ".join(t["best"] for t in (r.get("tuning") or {}).values())),
        ("speed vs torch", lambda r: "" if r.get("vs_torch") is None else f"{r['vs_torch']:.2f}x"),
        ("max |diff| vs torch", lambda r: "" if r.get("max_diff") is None else f"{r['max_diff']:.3g}"),
    ]
    where = torch.cuda.get_device_name() if cuda else "CPU, Triton interpreter (times mean nothing)"
    print(f"kernels on {where}")
    print(render(rows, columns))
    for path in filter(None, (args.json, args.rows_to)):
        write_jsonl(path, rows)
    if args.json:
        print(f"wrote {args.json}")
    return rows


def _in_interpreter(args) -> list[dict]:
    """Run this mode again in a process started with Triton's interpreter on.

    Triton reads ``TRITON_INTERPRET`` when it is imported, and ``import memcompile`` has imported it
    already in this process (through the NF4 layers), so setting it here would be too late.
    """
    with tempfile.TemporaryDirectory() as tmp:
        rows_to = os.path.join(tmp, "rows.jsonl")
        cmd = [sys.executable, "-m", "memcompile.bench", "kernels", "--allow-cpu", "--rows-to", rows_to]
        if args.json:
            cmd += ["--json", args.json]
        subprocess.run(cmd, env={**os.environ, **INTERPRETER_ENV}, check=True)
        with open(rows_to) as f:
            return [json.loads(line) for line in f]
