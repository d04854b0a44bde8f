"""``max-context`` mode: the longest sequence whose training step fits in a given GPU memory, per setup.

    python -m memcompile.bench max-context --model llama8b --gpu-memory 80GiB

For each setup, in its own process, the model is built once on the meta device (``estimate``) and its
step is counted at one length after another: the peak (weights, AdamW moments and the most the step
holds at once) grows with the length, so the longest length that fits is bracketed by doubling from
``--resolution`` tokens, then narrowed to ``--resolution`` by bisection. Each probe guesses by
interpolating the bracket's two peaks (the peak is close to linear in the length, attention being
the fused kernel) and falls back to the midpoint when a guess does not narrow the bracket by half, so
a few probes do where plain bisection needs a dozen; compiled setups recompile at every probe.

With CUDA, each estimate is then confirmed by one real training step at the length found and one at
``--resolution`` tokens above it (``train`` mode's process, one step, batch 1): the first should fit
and the second should run out of memory, if the estimate is right.

Anchor: Unsloth reports 342,733 tokens for Llama-3.1-8B QLoRA on one 80 GB GPU, and 28,454 for
Hugging Face with FlashAttention 2.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

from memcompile.bench.builders import Options
from memcompile.bench.runner import Progress, run_isolated, run_setups
from memcompile.bench.setups import SETUPS, select
from memcompile.bench.table import NA, fmt_num, render, status_notes, write_jsonl

GIB = 2**30
DEFAULT_SETUPS = ("lora_gc", "nf4_gc", "memtrain_all_budget")
# Published figures for Llama-3.1-8B QLoRA at batch 1 on one 80 GB GPU (unsloth.ai, "Unsloth Gradient
# Checkpointing" long-context table).
ANCHORS = {"llama8b": {"Unsloth": 342_733, "Hugging Face + FlashAttention 2": 28_454}}


def parse_memory(text: str) -> int:
    """Bytes of ``"80GiB"``, ``"80GB"`` (10^9), ``"79.5 GiB"`` or a bare number of GiB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(GiB|GB|MiB|MB)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 80GiB, 80GB, 79.5)")
    unit = (m.group(2) or "GiB").lower()
    scale = {"gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6}[unit]
    return int(float(m.group(1)) * scale)


def search(peak_of: Callable[[int], int], limit: int, resolution: int, longest: int, start: int | None = None,
           report: Callable[[int, int], None] = lambda seq, peak: None) -> dict:
    """The longest multiple of ``resolution`` up to ``longest`` whose ``peak_of(seq) <= limit``, doubling
    from ``start`` (default: ``resolution``) to bracket it.

    Returns ``fits`` (0 if not even ``resolution`` fits), its peak, ``fails`` (the shortest length
    probed that did not fit, ``None`` if ``longest`` fits) and its peak, and every probe in order.
    """
    probes: list[tuple[int, int]] = []

    def probe(seq: int) -> int:
        peak = peak_of(seq)
        probes.append((seq, peak))
        report(seq, peak)
        return peak

    longest = max(resolution, longest // resolution * resolution)
    lo, lo_peak = 0, None
    hi = min(longest, max(resolution, (start or resolution) // resolution * resolution))
    hi_peak = probe(hi)
    while hi_peak <= limit:  # double until a length does not fit
        lo, lo_peak = hi, hi_peak
        if hi >= longest:
            return dict(fits=lo, fits_peak=lo_peak, fails=None, fails_peak=None, probes=probes)
        hi = min(2 * hi, longest)
        hi_peak = probe(hi)
    use_mid = False
    while hi - lo > resolution:  # lo fits, hi does not; both multiples of resolution
        width = hi - lo
        seq = lo + width // 2 // resolution * resolution
        interpolate = not use_mid and lo_peak is not None and hi_peak > lo_peak
        if interpolate:  # where the line through the bracket's two peaks crosses the limit
            guess = lo + int((limit - lo_peak) * width / (hi_peak - lo_peak)) // resolution * resolution
            seq = min(max(guess, lo + resolution), hi - resolution)
        peak = probe(seq)
        if peak <= limit:
            lo, lo_peak = seq, peak
            if interpolate and seq + resolution < hi:  # a good guess lies just below the crossing
                up_peak = probe(seq + resolution)
                if up_peak <= limit:
                    lo, lo_peak = seq + resolution, up_peak
                else:
                    hi, hi_peak = seq + resolution, up_peak
        else:
            hi, hi_peak = seq, peak
        use_mid = hi - lo > width / 2  # the guess did not halve the bracket: bisect next
    return dict(fits=lo, fits_peak=lo_peak, fails=hi, fails_peak=hi_peak, probes=probes)


def run_setup(job: dict, progress: Callable[[str], None]) -> dict:
    """In the setup's own process: the model built once on meta, counted at each probed length."""
    import torch

    import memcompile
    from memcompile.bench.estimate import build_meta, count_step

    setup = SETUPS[job["setup"]]
    opts = Options(**job["options"])
    progress("building the model on the meta device")
    model, forward, compiler, context = build_meta(setup, opts, torch.bfloat16)

    def peak_of(seq: int) -> int:
        progress(f"counting {seq:,} tokens")
        if setup.compiled:  # a new length is a new graph: start the compile afresh
            torch.compiler.reset()
            memcompile.activation_state.reset()
            memcompile.clear_reports()
        row = count_step(setup, model, forward, context, opts.batch, seq)
        breakdown[seq] = row["at_peak"]
        return row["weights_bytes"] + row["optimizer_bytes"] + row["step_peak_bytes"]

    breakdown: dict[int, list] = {}  # what was live at each probe's peak, by the op that made it

    found = search(peak_of, job["limit_bytes"], job["resolution"], job["longest"], job.get("start"))
    return dict(device="meta", compiler=compiler, model=opts.model, batch=opts.batch, limit_bytes=job["limit_bytes"],
                fits_bytes=found["fits_peak"], fails_bytes=found["fails_peak"],
                limit_gib=round(job["limit_bytes"] / GIB, 3), resolution=job["resolution"],
                fits=found["fits"], fits_gib=_gib(found["fits_peak"]), fails=found["fails"],
                fails_gib=_gib(found["fails_peak"]), probes=[[s, _gib(p)] for s, p in found["probes"]],
                at_fits_peak=breakdown.get(found["fits"], []))


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / GIB, 3)


def confirm(rows: list[dict], args) -> None:
    """With CUDA: one real step at each setup's length found and one at ``resolution`` above it."""
    jobs = []
    for r in rows:
        if r["status"] != "ok" or not r["fits"]:
            continue
        for key, seq in (("at_fits", r["fits"]), ("above", r["fits"] + r["resolution"])):
            opts = Options(model=args.model, seq=seq, batch=args.batch, compiler="inductor", budget=args.budget,
                           seed=args.seed)
            jobs.append((r, key, {"mode": "train", "setup": r["setup"], "options": dataclasses.asdict(opts),
                                  "warmup": 0, "steps": 1, "count_saved": False}))
    progress = Progress(len(jobs))
    for row, key, job in jobs:
        result = run_isolated(job, progress, timeout=args.timeout)
        row[f"gpu_{key}"] = dict(seq=job["options"]["seq"], status=result["status"],
                                 peak_gib=result.get("peak_gib"))


def columns(status, cuda: bool) -> list:
    ok = lambda fn: lambda r: fn(r) if r["status"] == "ok" else ""  # noqa: E731
    cols = [("setup", lambda r: r["setup"]), ("status", status), ("compiler", ok(lambda r: r["compiler"])),
            ("longest that fits", ok(lambda r: f"{r['fits']:,}")), ("est. peak GiB", ok(lambda r: fmt_num(r["fits_gib"]))),
            ("first that does not", ok(lambda r: NA if r["fails"] is None else f"{r['fails']:,}")),
            ("its est. peak GiB", ok(lambda r: fmt_num(r["fails_gib"]))), ("probes", ok(lambda r: len(r["probes"])))]
    if cuda:
        def real(key):
            def cell(r):
                g = r.get(f"gpu_{key}")
                if not g:
                    return NA
                return f"{g['status']}" + (f" {g['peak_gib']:.2f} GiB" if g.get("peak_gib") is not None else "")
            return cell
        cols += [("GPU step at it", real("at_fits")), ("GPU step above", real("above"))]
    return cols


def main(args) -> list[dict]:
    import torch

    limit = parse_memory(args.gpu_memory)
    setups = select(args.setups or ",".join(DEFAULT_SETUPS), "train", DEFAULT_SETUPS)
    opts = Options(model=args.model, seq=args.resolution, batch=args.batch, compiler="aot_eager",
                   budget=args.budget, seed=args.seed, threads=args.threads or 1)
    print(f"max-context: model={args.model} batch={args.batch} within {limit / GIB:.2f} GiB, to "
          f"{args.resolution:,} tokens, on the meta device", flush=True)
    rows = run_setups(setups, lambda setup: {"mode": "max-context", "setup": setup.name,
                                             "options": dataclasses.asdict(opts), "limit_bytes": limit,
                                             "resolution": args.resolution, "longest": args.longest,
                                             "start": args.start},
                      timeout=args.timeout)
    cuda = torch.cuda.is_available() and not args.no_confirm
    if cuda:
        print("\nconfirming on the GPU: one real step at each length found, one above it", flush=True)
        confirm(rows, args)
    status, notes = status_notes(rows)
    print()
    print(render(rows, columns(status, cuda)))
    print("\n".join(["", *notes] if notes else []))
    for r in rows:
        if r["status"] == "ok":
            print(f"  {r['setup']} probes (tokens: est. GiB): " +
                  ", ".join(f"{s:,}: {g:.2f}" for s, g in r["probes"]))
    for source, tokens in ANCHORS.get(args.model, {}).items():
        print(f"anchor: {source}: {tokens:,} tokens (Llama-3.1-8B QLoRA, batch 1, one 80 GB GPU)")
    if args.json:
        write_jsonl(args.json, rows)
        print(f"wrote {args.json}")
    return rows
