"""``train`` mode: peak memory, throughput and saved activations of one full fine-tuning step per setup.

Each setup runs in its own process (``runner``): warm-up steps, then timed steps of forward, backward
and optimizer step on a fixed random batch. Reported per setup: peak allocated memory (CUDA), bytes
of activations saved for backward, tokens/s (median of the timed steps), the first step's time (the
compile, for compiled setups), first and last loss, and memory and speed relative to ``--baseline``.
On CUDA the memory ratio compares peak memory, on CPU saved-activation bytes.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable

import torch

from memcompile import _torch_compat as tc
from memcompile.bench import measure, models
from memcompile.bench.builders import TRAIN_LR, Options, build, memtrain_extra
from memcompile.bench.runner import run_setups
from memcompile.bench.setups import SETUPS, TRAIN_DEFAULT, select
from memcompile.bench.table import NA, fmt_bytes, fmt_num, fmt_ratio, render, status_notes, write_jsonl

# The anchors' run on CUDA (tinyllama, seq 2048, batch 4, 2 + 4 steps), a tiny one on CPU.
GPU_DEFAULTS = dict(model="tinyllama", seq=2048, batch=4, steps=4, warmup=2)
CPU_DEFAULTS = dict(model="tiny", seq=64, batch=2, steps=3, warmup=1)


def _saved_activations(built, ids) -> dict:
    """Saved-activation bytes: memtrain's own report for memtrain setups (of the graphs this forward
    ran), hooks for every setup."""
    frozen = [*built.model.parameters(), *built.model.buffers(), ids]
    try:
        # device: a memory plan's host copies are not the accelerator's memory
        hooks = measure.saved_bytes(lambda: built.forward(input_ids=ids, labels=ids), frozen,
                                    measure.checkpointed_layers(built.model), device=ids.device.type)
        hooks_error = None
    except Exception as e:  # a compiled graph that rejects the hooks: "n/a", not a guess
        hooks, hooks_error = None, f"{type(e).__name__}: {e}"[:160]
    row = dict(saved_bytes=hooks, saved_by="hooks" if hooks is not None else None, saved_bytes_before=None,
               saved_bytes_hooks=hooks, saved_bytes_hooks_error=hooks_error)
    reported = measure.memtrain_saved_bytes() if built.setup.compile == "memtrain" else None
    if reported is not None:
        row.update(saved_bytes=reported[0], saved_by="memtrain report", saved_bytes_before=reported[1])
    return row


def run_setup(job: dict, progress: Callable[[str], None]) -> dict:
    """In the setup's own process: build, train ``warmup + steps`` steps, measure."""
    setup = SETUPS[job["setup"]]
    opts = Options(**job["options"])
    device = models.default_device()
    dtype = models.train_dtype(device)
    progress("loading the model")
    built = build(setup, opts, device, dtype, lr=TRAIN_LR)
    ids = models.random_tokens(built.model.config.vocab_size, opts.batch, opts.seq, device, opts.seed)
    state_gib = measure.allocated_gib(device)
    measure.reset_peak(device)
    warmup, total = job["warmup"], job["warmup"] + job["steps"]
    times: list[float] = []
    losses: list[float] = []
    graphs_before = tc.dynamo_graph_count()
    lengths = torch.Generator().manual_seed(opts.seed + 1)
    tokens: list[int] = []
    peak_first = None
    with built.context:
        for i in range(total):
            progress(f"step {i + 1}/{total}" + (" (compiling)" if i == 0 and setup.compiled else ""))
            step_ids = ids
            if opts.min_seq is not None:  # a length per step, as padding-free or length-grouped batches give
                step_ids = ids[:, :int(torch.randint(opts.min_seq, opts.seq + 1, (), generator=lengths))]
            tokens.append(step_ids.numel())
            with measure.timed(device, times):
                loss = built.step(step_ids)
            losses.append(loss.item())
            if i == 0:
                # The first step also compiles (and autotunes on real buffers): its peak apart from the rest.
                peak_first = measure.peak_gib(device)
                measure.reset_peak(device)
        # Read before the counting forward below can add to it.
        peak_later = measure.peak_gib(device) if total > 1 else None
        peak = max((p for p in (peak_first, peak_later) if p is not None), default=None)
        top = busy_ms = host_top = None
        at_peak: dict = {}
        if job.get("profile"):  # more steps, after the measured ones, so the profiler changes none of them
            progress("profiling a step")
            path = os.path.join(job["profile"], f"profile-{setup.name}.txt")
            top, busy_ms, host_top = measure.profile(lambda: built.step(ids), device, path)
            top, host_top = top[:10], host_top[:10]
            # What is allocated at the step's peak, by allocation site (on a GPU): where the peak goes
            # beyond the saved activations.
            progress("tracing the allocator over a step")
            at_peak = measure.peak_breakdown(lambda: built.step(ids), device,
                                             os.path.join(job["profile"], f"peak-{setup.name}.txt")) or {}
        if job.get("count_saved", True):
            progress("counting saved activations")
            saved = _saved_activations(built, ids)
        else:  # a step at the edge of memory (max-context): one more forward could run out where the step did not
            saved = dict(saved_bytes=None, saved_by=None, saved_bytes_before=None, saved_bytes_hooks=None,
                         saved_bytes_hooks_error="not counted")
    graphs = tc.dynamo_graph_count() - graphs_before
    step_s = measure.median(times[warmup:])
    tok_per_s = sum(tokens[warmup:]) / sum(times[warmup:])
    return dict(
        device=device.type, dtype=str(dtype).removeprefix("torch."), compiler=built.compiler, model=opts.model,
        seq=opts.seq, batch=opts.batch, warmup=warmup, steps=job["steps"],
        peak_gib=None if peak is None else round(peak, 3),
        peak_first_gib=None if peak_first is None else round(peak_first, 3),
        peak_later_gib=None if peak_later is None else round(peak_later, 3),
        model_state_gib=None if state_gib is None else round(state_gib, 3),
        min_seq=opts.min_seq, graphs=graphs,
        step_s=round(step_s, 4), tok_per_s=round(tok_per_s, 1), compile_s=round(times[0], 2),
        loss_first=losses[0], loss_last=losses[-1], **saved, profile_top=top, profile_busy_ms=busy_ms,
        profile_host_top=host_top, **at_peak,
        trainable=sum(p.numel() for p in built.params), params=sum(p.numel() for p in built.model.parameters()))


def add_ratios(rows: list[dict], baseline: str, metric: str) -> None:
    """``mem_ratio`` (``metric`` / baseline's) and ``speed_ratio`` (tokens/s / baseline's) on every row."""
    base = next((r for r in rows if r["setup"] == baseline and r["status"] == "ok"), None)

    def ratio(row: dict, key: str) -> float | None:
        if base is None or row.get(key) is None or not base.get(key):
            return None
        return round(row[key] / base[key], 3)

    for r in rows:
        r.update(baseline=baseline, mem_metric=metric, mem_ratio=ratio(r, metric), speed_ratio=ratio(r, "tok_per_s"))


def _ok(fn):
    return lambda r: fn(r) if r["status"] == "ok" else ""


def _loss(x: float) -> str:
    return f"{x:.4f}" if math.isfinite(x) else str(x)


def columns(cuda: bool, status: Callable[[dict], str]) -> list:
    cols = [("setup", lambda r: r["setup"]), ("status", status),
            ("compiler", _ok(lambda r: r["compiler"]))]
    if cuda:
        cols.append(("peak GiB", _ok(lambda r: fmt_num(r["peak_gib"]))))
    cols += [
        ("saved activations", _ok(lambda r: fmt_bytes(r["saved_bytes"]))),
        ("counted by", _ok(lambda r: r["saved_by"] or NA)),
        ("tok/s", _ok(lambda r: fmt_num(r["tok_per_s"], 0))),
        ("1st step s", _ok(lambda r: fmt_num(r["compile_s"]))),
        ("graphs", _ok(lambda r: str(r.get("graphs", NA)))),
        ("loss first", _ok(lambda r: _loss(r["loss_first"]))),
        ("loss last", _ok(lambda r: _loss(r["loss_last"]))),
        ("memory vs base", _ok(lambda r: fmt_ratio(r["mem_ratio"]))),
        ("speed vs base", _ok(lambda r: fmt_ratio(r["speed_ratio"]))),
    ]
    return cols


def main(args) -> list[dict]:
    device = models.device_and_defaults(args, GPU_DEFAULTS, CPU_DEFAULTS)
    cuda = device.type == "cuda"
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    compiler = args.compiler if args.compiler != "auto" else ("inductor" if cuda else "aot_eager")
    setups = select(args.setups, "train", TRAIN_DEFAULT)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    if args.min_seq is not None and not 1 < args.min_seq <= args.seq:
        raise SystemExit(f"--min-seq must be in [2, --seq={args.seq}], got {args.min_seq}")
    opts = Options(model=args.model, seq=args.seq, batch=args.batch, compiler=compiler, budget=args.budget,
                   seed=args.seed, threads=args.threads or (None if cuda else 1), min_seq=args.min_seq,
                   memtrain=memtrain_extra(args))
    print(f"train: model={args.model} seq={args.seq} batch={args.batch} warmup={args.warmup} steps={args.steps} "
          f"device={device.type} dtype={str(models.train_dtype(device)).removeprefix('torch.')} "
          f"compiled setups: {compiler}", flush=True)
    rows = run_setups(setups, lambda setup: {"mode": "train", "setup": setup.name,
                                             "options": dataclasses.asdict(opts), "warmup": args.warmup,
                                             "steps": args.steps, "profile": args.profile}, timeout=args.timeout)
    add_ratios(rows, args.baseline, "peak_gib" if cuda else "saved_bytes")
    status, notes = status_notes(rows)
    print()
    print(render(rows, columns(cuda, status)))
    print("\n".join(["", *notes] if notes else []) + legend(rows, args, cuda, compiler))
    if args.json:
        write_jsonl(args.json, rows)
        print(f"wrote {args.json}")
    return rows


def legend(rows: list[dict], args, cuda: bool, compiler: str) -> str:
    lines = [""]
    base = next((r for r in rows if r["setup"] == args.baseline), None)
    metric = "peak GiB" if cuda else "saved-activation bytes"
    if base is None:
        lines.append(f"ratios: n/a, baseline {args.baseline!r} was not run (add it to --setups)")
    elif base["status"] != "ok":
        lines.append(f"ratios: n/a, baseline {args.baseline!r} did not run ({base['status']})")
    else:
        lines.append(f"ratios against {args.baseline}: memory = {metric} / baseline's (lower is better), "
                     "speed = tok/s / baseline's (higher is better)")
    lines.append("saved activations: unique storages kept for backward, parameters and the batch not counted; "
                 "'memtrain report' = memcompile.report() (the passes' own count), 'hooks' = "
                 "torch.autograd.graph.saved_tensors_hooks, plus, with gradient checkpointing, the inputs "
                 "each checkpointed layer keeps")
    if not cuda and compiler == "aot_eager":
        lines.append("CPU: compiled setups run their graphs in Python (memtrain compiler=aot_eager; torch.compile "
                     "backend=aot_eager_decomp_partition, Inductor's partitioner), because Inductor's C++ compile "
                     "takes about a minute per setup here; --compiler inductor runs Inductor; tok/s on CPU says "
                     "nothing about GPU speed")
    lines.append("1st step s: the first step's wall time, which includes the compile for compiled setups")
    return "\n".join(lines)
