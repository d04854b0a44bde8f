"""Time to the first training step: the whole model compiled at once against one compiled block
reused for every layer (``memcompile.compile_blocks``).

    python -m memcompile.bench compile-time --model tinyllama --seq 128 --batch 1

Each variant runs in its own process with an empty Inductor cache, so neither reuses the other's
kernels; with ``--warm`` it then runs again in a new process with the caches the first one left (a
restarted run), recorded with ``"caches": "warm"``. The first step is timed (trace, compile, run),
then a second step (run only); the difference is the compile. The second step also counts the bytes
autograd keeps for the backward (``measure.saved_bytes``, eager parts included), which both variants
must match.

Before the model, each process times a trivial compile (``startup_s``): what Inductor pays once per
process whatever it compiles (its first imports, the host's vector-ISA probes, a first kernel build,
the Triton key). ``first_step_s`` is then the model's own; ``cold_first_step_s`` is the sum, what a
user's first step costs in a fresh process (with the caches a row's ``caches`` says).

With ``--profile DIR`` the regional variant then runs once more in a fresh process with an empty cache,
its first step under ``cProfile``: ``DIR/compile-time-profile-regional.txt`` ranks the functions by
cumulative and by own time, which the stage timers do not split (the rest of the first step).
"""
from __future__ import annotations

import contextlib
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile

import torch

# The first step's compile stages, disjoint, each the sum of Dynamo's timers named (``phases_s``); what
# is left of the first step is running it (and guards, eager code, the process's first kernel launches).
STAGES = (
    ("Dynamo's bytecode trace", ("bytecode_tracing",)),
    ("AOTAutograd's joint trace", ("aot_collect_metadata", "aot_trace_joint_graph")),
    ("Inductor's joint-graph passes", ("_recursive_joint_graph_passes",)),
    ("memtrain's passes", ("memtrain.pre_aot", "memtrain.report_copy", "memtrain.joint_passes",
                           "memtrain.partitioned_passes")),
    ("partition (min-cut)", ("memtrain.partition",)),
    ("Inductor's lowering and code generation", ("GraphLowering.run", "Scheduler.__init__", "GraphLowering.codegen")),
    # On a GPU, Triton kernels are built in the compiling process, one after another, until Inductor's
    # build workers are up ("precompile"), then in them while the compile goes on ("wait").
    ("kernel builds (waiting for workers, or in the compiling process)", ("async_compile.wait",
                                                                         "async_compile.precompile")),
    ("autotuning at the first run", ("CachingAutotuner.benchmark_all_configs",)),
)


# Dynamo's timer around one graph's compile by the backend's compiler (Inductor), forward or backward.
GRAPH_COMPILE = "compile_fx_inner"


def label(row: dict) -> str:
    """A row's variant, with "(warm caches)" for a restarted run's."""
    return row["variant"] + (" (warm caches)" if row.get("caches") == "warm" else "")


def stages(row: dict) -> list[tuple[str, float]]:
    """A compile-time row's first step by stage (``STAGES``), then the rest of it; empty for a row
    without a breakdown."""
    phases = row.get("phases_s")
    if not phases:
        return []
    out = [(name, round(sum(phases.get(k, 0.0) for k in keys), 2)) for name, keys in STAGES]
    return [*out, ("the rest (running the step, guards, eager code)",
                   round(row["first_step_s"] - sum(v for _, v in out), 2))]


VARIANTS = {
    "whole": "torch.compile(model, backend='memtrain', options=...)",
    "regional": "memcompile.compile_blocks(model, options=...)",
}


def _build(model_name: str, dtype: torch.dtype, device: torch.device):
    from peft import LoraConfig, get_peft_model

    from memcompile.bench import models
    from memcompile.config import LLAMA_LINEARS

    torch.manual_seed(0)
    with torch.device(device):
        model = models.build(models.model_config(model_name)).to(dtype)
    model.config.use_cache = False
    model.train()
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                            target_modules=list(LLAMA_LINEARS)))


def _startup(compiler: str, device: torch.device) -> float:
    """Seconds of a first, trivial compiled forward and backward in this process, and on a GPU of
    Inductor's kernel-build workers coming up (until then it builds each Triton kernel in this
    process): the start-up every compile in a new process pays, whole model or block."""
    from memcompile import _torch_compat as tc
    from memcompile.bench import measure

    x = torch.randn(64, 64, device=device, requires_grad=True)
    fn = torch.compile(lambda t: (t.sin() + 1).sum(), backend=compiler)
    times: list[float] = []
    with measure.timed(device, times):
        fn(x).backward()
        if compiler == "inductor" and device.type == "cuda":
            tc.wait_kernel_build_pool()
    return times[0]


def run_variant(args) -> dict:
    """One variant in this process: build, compile, two steps."""
    import memcompile
    from memcompile import _torch_compat as tc
    from memcompile.bench import measure, models

    device = models.default_device()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = _build(args.model, dtype, device)
    startup = _startup(args.compiler, device)
    options = {"activation": args.activation, "compiler": args.compiler}
    graphs = tc.dynamo_graph_count()
    if args.variant == "regional":
        memcompile.compile_blocks(model, options)
        forward = model
    else:
        forward = torch.compile(model, backend="memtrain", options=options)
    ids = models.random_tokens(model.config.vocab_size, args.batch, args.seq, device)
    times = []
    phases_before, graphs_before = tc.compile_phase_seconds(), len(tc.compile_phase_calls(GRAPH_COMPILE))
    with measure.timed(device, times), _profiled(getattr(args, "profile_to", None)):
        forward(input_ids=ids, labels=ids).loss.backward()
    phases = phase_breakdown(phases_before, tc.compile_phase_seconds())
    graph_compiles = [round(t, 2) for t in tc.compile_phase_calls(GRAPH_COMPILE)[graphs_before:]]
    model.zero_grad(set_to_none=True)
    exclude = [*model.parameters(), *model.buffers(), ids]
    with measure.timed(device, times):
        saved = measure.saved_bytes(lambda: forward(input_ids=ids, labels=ids), exclude,
                                    then=lambda out: out.loss.backward())
    return {"variant": args.variant, "model": args.model, "seq": args.seq, "batch": args.batch, "dtype": args.dtype,
            "compiler": args.compiler, "activation": args.activation, "device": str(device),
            "startup_s": round(startup, 2), "cold_first_step_s": round(startup + times[0], 2),
            "first_step_s": round(times[0], 2), "second_step_s": round(times[1], 3),
            "compile_s": round(times[0] - times[1], 2), "dynamo_graphs": tc.dynamo_graph_count() - graphs,
            "saved_bytes": saved, "report_saved_bytes": memcompile.report().bytes_after, "phases_s": phases,
            "graph_compiles_s": graph_compiles, "compile_threads": tc.inductor_compile_threads()}


@contextlib.contextmanager
def _profiled(path: str | None, top: int = 60):
    """Profile the block with cProfile into ``path`` (functions by cumulative time, then by own time);
    nothing without a path."""
    if not path:
        yield
        return
    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        text = io.StringIO()
        stats = pstats.Stats(profile, stream=text)
        for key in ("cumulative", "tottime"):
            text.write(f"=== the first step's functions by {key} (cProfile's clock, slower than a timed run) ===\n")
            stats.sort_stats(key).print_stats(top)
        with open(path, "w") as f:
            f.write(text.getvalue())


def phase_breakdown(before: dict[str, float], after: dict[str, float], at_least: float = 0.01) -> dict[str, float]:
    """Seconds of each timed compile stage between two ``compile_phase_seconds()`` readings, largest
    first; stages nest (Inductor's backward compile contains its code generation), so they do not sum."""
    spent = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return {k: round(v, 3) for k, v in sorted(spent.items(), key=lambda kv: -kv[1]) if v >= at_least}


def main(args) -> list[dict]:
    def cmd_for(variant: str) -> list[str]:
        cmd = [sys.executable, "-m", "memcompile.bench", "compile-time", "--variant", variant,
               "--model", args.model, "--seq", str(args.seq), "--batch", str(args.batch), "--dtype", args.dtype,
               "--compiler", args.compiler, "--activation", args.activation]
        return cmd + (["--threads", str(args.threads)] if args.threads else [])

    if args.variant:
        row = run_variant(args)
        print("ROW " + json.dumps(row), flush=True)
        return [row]
    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
        cmd = cmd_for(variant)
        print(f"[compile-time] {variant}: {VARIANTS[variant]} ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="memcompile-inductor-") as cache:
            # --warm: the same variant again with the caches the first process left, as a restarted run
            for caches in ("cold", "warm") if args.warm else ("cold",):
                row = {**_run_child(cmd, cache, args.timeout, variant), "caches": caches}
                rows.append(row)
                print(f"[compile-time] {variant} ({caches} caches): {json.dumps(row)}", flush=True)
    for caches in ("cold", "warm"):
        _print_comparison({r["variant"]: r for r in rows if "error" not in r and r["caches"] == caches}, caches)
    if args.profile:
        _profile_regional(args, cmd_for("regional"))
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return rows


def _profile_regional(args, cmd: list[str]) -> None:
    os.makedirs(args.profile, exist_ok=True)
    path = os.path.join(args.profile, "compile-time-profile-regional.txt")
    print(f"[compile-time] regional, first step under cProfile -> {path} ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="memcompile-inductor-") as cache:
        row = _run_child([*cmd, "--profile-to", path], cache, args.timeout, "regional")
    if "error" in row:
        print(f"[compile-time] the profiled run failed: {row['error']}", flush=True)
    else:
        print(f"[compile-time] profiled first step {row['first_step_s']} s (cProfile's clock), wrote {path}", flush=True)


def _run_child(cmd: list[str], cache: str, timeout: float, variant: str) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache},
                         timeout=timeout)
    found = [line[4:] for line in out.stdout.splitlines() if line.startswith("ROW ")]
    if out.returncode != 0 or not found:
        return {"variant": variant, "error": (out.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(found[-1])


def _print_comparison(ok: dict[str, dict], caches: str) -> None:
    if not {"whole", "regional"} <= ok.keys():
        return
    w, r = ok["whole"], ok["regional"]
    print(f"{caches} caches, first step in a fresh process: whole {w['cold_first_step_s']} s, regional "
          f"{r['cold_first_step_s']} s ({w['cold_first_step_s'] / r['cold_first_step_s']:.1f}x faster); after "
          f"Inductor's start-up ({w['startup_s']} s, {r['startup_s']} s): {w['first_step_s']} s vs "
          f"{r['first_step_s']} s ({w['first_step_s'] / r['first_step_s']:.1f}x); compile {w['compile_s']} s vs "
          f"{r['compile_s']} s; saved for the backward {w['saved_bytes']} vs {r['saved_bytes']} B")
    for (name, a), (_, b) in zip(stages(w), stages(r)):
        print(f"  {name:<50} {a:8.2f} s {b:8.2f} s", flush=True)
    for variant, row in (("whole", w), ("regional", r)):
        if row.get("graph_compiles_s"):
            print(f"  {variant}: Inductor's compile of each graph, in order: {row['graph_compiles_s']} s "
                  f"(kernels built in {row['compile_threads']} processes)", flush=True)
