"""``converge`` mode: the same model trained on real text with each setup, loss curves side by side.

The text is the help text that ships with Python in seven sources of very different sizes
(``memcompile.textdata.sources``: from about half of the text down to 4 %), as byte tokens. Each step
draws a pool of ``pool_factor x --batch`` windows, the source of each row in proportion to source size
(``textdata.SourceBatches``); setups with the same pool factor see the same pools, from the same
weights, with a linear warm-up then a constant learning rate. Most setups train on the whole pool of
``--batch``; ``full_batch``, ``random_half`` and ``coreset`` draw pools of twice the batch and train on
all of it, a random half, or the CoLM coreset (``memcompile.data``).

Held-out loss is measured every ``--eval-every`` steps on fixed windows of the last 5 % of each source,
with the eager model (DyLoRA at its full rank), and reported per source, pooled (weighted by the
sources' shares of the training text, the mix the pools are drawn from) and source-balanced (the mean
over sources). Memory of a training step: peak allocated on CUDA; saved-activation bytes (hooks,
``measure.saved_bytes``) everywhere. Writes ``losses.csv``, ``losses.png`` and ``results.jsonl`` (one
line per setup, the curves included).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
from typing import Callable

from memcompile.bench import measure, models
from memcompile.bench.builders import Built, Options, build
from memcompile.bench.runner import run_setups
from memcompile.bench.setups import CONVERGE_DEFAULT, SETUPS, select
from memcompile.bench.table import fmt_bytes, fmt_num, fmt_ratio, render, status_notes

GPU_DEFAULTS = dict(model="tinyllama", seq=512, batch=8, steps=300)
CPU_DEFAULTS = dict(model="tiny", seq=64, batch=8, steps=100)
LR = 2e-3  # for setups without their own: LoRA on a random base needs a larger step than the anchors' 1e-4
EVAL_WINDOWS = 8  # held-out windows per source, one forward each
EVAL_SEED = 1234
MEMORY_BASELINE = "full_batch"  # the "memory vs" column compares against this setup when it ran


def _evaluate(built: Built, held_out: dict) -> dict[str, float]:
    """Held-out loss per source."""
    import torch

    model = built.model
    was_training = model.training
    model.eval()
    if built.before_eval is not None:
        built.before_eval()
    with torch.no_grad():
        losses = {name: model(input_ids=ids, labels=ids).loss.item() for name, ids in held_out.items()}
    model.train(was_training)
    return losses


def pooled(losses: dict[str, float], shares: dict[str, float]) -> float:
    """Loss under the training mix: per-source losses weighted by the sources' shares."""
    return sum(shares[name] * loss for name, loss in losses.items()) / sum(shares[name] for name in losses)


def balanced(losses: dict[str, float]) -> float:
    """Source-balanced loss: every source counts the same, however rare in the pools."""
    return sum(losses.values()) / len(losses)


def _saved_bytes(built: Built, ids, sources) -> tuple[int | None, str | None]:
    """Bytes saved for backward by one training step's loss (after training: a coreset's selection
    moves the selector's state)."""
    frozen = [*built.model.parameters(), *built.model.buffers(), ids]
    try:
        return measure.saved_bytes(lambda: built.loss(ids, sources), frozen,
                                   measure.checkpointed_layers(built.model)), None
    except Exception as e:  # a compiled graph that rejects the hooks: "n/a", not a guess
        return None, f"{type(e).__name__}: {e}"[:160]


def run_setup(job: dict, progress: Callable[[str], None]) -> dict:
    """In the setup's own process: ``steps`` training steps on the text, held-out loss along the way."""
    import torch

    from memcompile import textdata

    setup = SETUPS[job["setup"]]
    opts = Options(**job["options"])
    device = models.default_device()
    dtype = models.train_dtype(device)
    lr = job["lr"] or setup.lr or LR
    progress("loading the model")
    built = build(setup, opts, device, dtype, lr)
    sources = textdata.sources()
    pool = opts.batch * built.pool_factor
    data = textdata.SourceBatches(sources, opts.seq, pool, seed=opts.seed)
    held = textdata.SourceBatches(sources, opts.seq, EVAL_WINDOWS, seed=EVAL_SEED, split="eval")
    held_out = {name: ids.to(device) for name, ids in held.per_source(EVAL_WINDOWS).items()}
    shares = data.shares
    steps, every = job["steps"], job["eval_every"]
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(built.optimizer, lambda s: min(1.0, (s + 1) / warmup))
    losses: list[float] = []
    times: list[float] = []
    by_source: list[tuple[int, dict[str, float]]] = [(0, _evaluate(built, held_out))]
    digest = hashlib.sha1()  # of every pool: equal digests, equal data
    trained = dict.fromkeys(data.names, 0)  # rows trained per source, over the run
    peaks: list[float] = []
    with built.context:
        for step in range(1, steps + 1):
            progress(f"step {step}/{steps}")
            ids, labels = next(data)
            digest.update(ids.numpy().tobytes())
            digest.update(labels.numpy().tobytes())
            ids = ids.to(device)
            measure.reset_peak(device)
            with measure.timed(device, times):
                loss = built.step(ids, labels)
            peak = measure.peak_gib(device)
            if peak is not None:
                peaks.append(peak)
            for i in labels[built.last_rows].tolist():
                trained[data.names[i]] += 1
            losses.append(loss.item())
            sched.step()
            if step % every == 0 or step == steps:
                by_source.append((step, _evaluate(built, held_out)))
        progress("counting saved activations")
        ids, labels = next(data)
        saved, saved_error = _saved_bytes(built, ids.to(device), labels)
    rows = sum(trained.values()) / steps
    # Optimizer state (moments, projectors, limiter scalars): what Fira and GaLore keep low-rank.
    opt_state = sum(t.numel() * t.element_size() for st in built.optimizer.state.values()
                    for t in st.values() if isinstance(t, torch.Tensor))
    # Steps after the first, which compiles: the first step's time is reported on its own.
    steady = times[1:] or times
    return dict(device=device.type, dtype=str(dtype).removeprefix("torch."), compiler=built.compiler, lr=lr,
                model=opts.model, seq=opts.seq, batch=opts.batch, steps=steps, pool_rows=pool, rows_trained=rows,
                first_step_s=round(times[0], 2), train_s=round(sum(times), 2),
                tok_per_s=round(len(steady) * rows * opts.seq / sum(steady), 1),
                peak_gib=round(max(peaks), 3) if peaks else None, saved_bytes=saved, saved_bytes_error=saved_error,
                losses=losses, evals=[(s, pooled(ls, shares)) for s, ls in by_source],
                evals_balanced=[(s, balanced(ls)) for s, ls in by_source], evals_by_source=by_source,
                source_shares=shares, trained_by_source=trained, data_sha1=digest.hexdigest(),
                trainable=sum(p.numel() for p in built.params), optimizer_state_bytes=opt_state)


def _source_names(rows: list[dict]) -> list[str]:
    return next((list(r["source_shares"]) for r in rows if r["status"] == "ok"), [])


def write_csv(rows: list[dict], path: str) -> None:
    """One line per setup and step: train loss, and at evaluated steps the held-out losses (pooled,
    source-balanced, per source)."""
    names = _source_names(rows)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setup", "step", "train_loss", "eval_loss", "eval_balanced", *(f"eval_{n}" for n in names)])
        for r in rows:
            if r["status"] != "ok":
                continue
            evals, evals_bal, per = dict(r["evals"]), dict(r["evals_balanced"]), dict(r["evals_by_source"])

            def held(step: int) -> list[str]:
                if step not in evals:
                    return [""] * (2 + len(names))
                return [f"{evals[step]:.5f}", f"{evals_bal[step]:.5f}", *(f"{per[step][n]:.5f}" for n in names)]

            if 0 in evals:
                w.writerow([r["setup"], 0, "", *held(0)])
            for step, loss in enumerate(r["losses"], 1):
                w.writerow([r["setup"], step, f"{loss:.5f}", *held(step)])


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    done = [r for r in rows if r["status"] == "ok"]
    window = max(1, max((len(r["losses"]) for r in done), default=1) // 20)
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in done:
        losses = r["losses"]
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        (line,) = ax_train.plot(range(1, len(losses) + 1), smooth, label=r["setup"], linewidth=1.2)
        if r["evals"]:
            steps, evals = zip(*r["evals"])
            ax_eval.plot(steps, evals, marker="o", markersize=3, label=r["setup"], color=line.get_color())
        if r.get("evals_balanced"):  # examples/plot_losses.py plots runs without sources
            steps, evals = zip(*r["evals_balanced"])
            ax_eval.plot(steps, evals, linestyle="--", linewidth=1, color=line.get_color())
    ax_train.set(title="train loss" + (f" (mean of the last {window} steps)" if window > 1 else ""), xlabel="step", ylabel="cross-entropy (nats/byte)")
    sourced = any(r.get("evals_balanced") for r in done)
    ax_eval.set(title="held-out loss" + (" (solid: pooled, dashed: source-balanced)" if sourced else ""),
                xlabel="step")
    for ax in (ax_train, ax_eval):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ok(fn):
    return lambda r: fn(r) if r["status"] == "ok" else ""


def _tail_mean(losses: list[float]) -> float:
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail)


def _rows_per_step(r: dict) -> str:
    rows = r["rows_trained"]
    return f"{rows:g} of {r['pool_rows']}" if rows == int(rows) else f"{rows:.2f} of {r['pool_rows']}"


def add_memory_ratios(rows: list[dict], cuda: bool) -> None:
    """``mem_ratio``: peak GiB (CUDA) or saved-activation bytes (CPU) over ``MEMORY_BASELINE``'s."""
    metric = "peak_gib" if cuda else "saved_bytes"
    base = next((r for r in rows if r["setup"] == MEMORY_BASELINE and r["status"] == "ok"), None)
    for r in rows:
        ok = base is not None and r["status"] == "ok" and r.get(metric) is not None and base.get(metric)
        r["mem_metric"] = metric
        r["mem_ratio"] = round(r[metric] / base[metric], 3) if ok else None


def columns(status: Callable[[dict], str], cuda: bool = False, memory_ratio: bool = True) -> list:
    cols = [
        ("setup", lambda r: r["setup"]),
        ("status", status),
        ("compiler", _ok(lambda r: r["compiler"])),
        ("lr", _ok(lambda r: f"{r['lr']:g}")),
        ("rows/step", _ok(_rows_per_step)),
        ("first loss", _ok(lambda r: fmt_num(r["losses"][0], 4))),
        ("last loss (mean last 10%)", _ok(lambda r: fmt_num(_tail_mean(r["losses"]), 4))),
        ("held-out start", _ok(lambda r: fmt_num(r["evals"][0][1], 4))),
        ("held-out end", _ok(lambda r: fmt_num(r["evals"][-1][1], 4))),
        ("balanced end", _ok(lambda r: fmt_num(r["evals_balanced"][-1][1], 4))),
    ]
    if cuda:
        cols.append(("peak GiB", _ok(lambda r: fmt_num(r["peak_gib"], 3))))
    cols += [
        ("saved activations", _ok(lambda r: fmt_bytes(r["saved_bytes"]))),
        ("optimizer state", _ok(lambda r: fmt_bytes(r.get("optimizer_state_bytes")))),
    ]
    if memory_ratio:
        cols.append((f"memory vs {MEMORY_BASELINE}", _ok(lambda r: fmt_ratio(r.get("mem_ratio")))))
    cols += [
        ("tok/s", _ok(lambda r: fmt_num(r["tok_per_s"], 0))),
        ("1st step s", _ok(lambda r: fmt_num(r["first_step_s"], 1))),
        ("train s", _ok(lambda r: fmt_num(r["train_s"], 1))),
    ]
    return cols


def source_columns(rows: list[dict]) -> tuple[list, list]:
    """Two per-source tables: held-out loss at the end, and each source's share of the trained rows.

    Headers carry the source's share of the training text: a coreset that keeps small sources whole
    trains on them more often than that share."""
    names = _source_names(rows)
    shares = next((r["source_shares"] for r in rows if r["status"] == "ok"), {})
    ok = [r for r in rows if r["status"] == "ok"]
    first = ("setup", lambda r: r["setup"])

    def loss(name):
        return lambda r: fmt_num(r["evals_by_source"][-1][1][name], 4)

    def share(name):
        return lambda r: f"{100 * r['trained_by_source'][name] / max(1, sum(r['trained_by_source'].values())):.1f}%"

    heads = {n: f"{n} ({100 * shares[n]:.0f}%)" for n in names}
    held = [first, *((heads[n], loss(n)) for n in names)]
    trained = [first, *((heads[n], share(n)) for n in names)]
    return render(ok, held) if ok else "", render(ok, trained) if ok else ""


def main(args) -> list[dict]:
    device = models.device_and_defaults(args, GPU_DEFAULTS, CPU_DEFAULTS)
    cuda = device.type == "cuda"
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    every = args.eval_every or max(1, args.steps // 10)
    compiler = args.compiler if args.compiler != "auto" else ("inductor" if cuda else "aot_eager")
    setups = select(args.setups, "converge", CONVERGE_DEFAULT)
    opts = Options(model=args.model, seq=args.seq, batch=args.batch, compiler=compiler, budget=args.budget,
                   seed=args.seed, threads=args.threads or (None if cuda else 1))
    title = (f"{args.model}, seq {args.seq}, batch {args.batch}, {args.steps} steps, {device.type}, "
             f"compiled setups: {compiler}")
    print(f"converge: {title}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    rows = run_setups(setups, lambda setup: {"mode": "converge", "setup": setup.name,
                                             "options": dataclasses.asdict(opts), "steps": args.steps,
                                             "eval_every": every, "lr": args.lr}, timeout=args.timeout)
    add_memory_ratios(rows, cuda)
    csv_path, png_path = os.path.join(args.out, "losses.csv"), os.path.join(args.out, "losses.png")
    write_csv(rows, csv_path)
    plot(rows, png_path, title)
    with open(os.path.join(args.out, "results.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    status, notes = status_notes(rows)
    print()
    ratios = any(r["setup"] == MEMORY_BASELINE and r["status"] == "ok" for r in rows)
    print(render(rows, columns(status, cuda, ratios)))
    if notes:
        print("\n" + "\n".join(notes))
    held, trained = source_columns(rows)
    if held:
        print("\nheld-out loss per source at the end (header: the source's share of the training text)")
        print(held)
        print("\nshare of the trained rows from each source, over the run")
        print(trained)
    print(f"\nheld-out loss: {EVAL_WINDOWS} fixed windows from the last 5% of each source, eager model (DyLoRA "
          f"at full rank), in nats per byte (ln 256 = {math.log(256):.2f} is a uniform guess); 'held-out' is "
          f"pooled (per-source losses weighted by the source's share of the training text), 'balanced' the "
          f"mean over sources")
    memory = "peak GiB: peak allocated during the training steps; " if cuda else ""
    if ratios:
        memory += f"'memory vs {MEMORY_BASELINE}' compares {'peak GiB' if cuda else 'saved activations'}; "
    print(f"rows/step: rows trained per step, of the pool drawn; saved activations: bytes kept for backward by "
          f"one training step (hooks; parameters and the batch not counted); {memory}tok/s: trained tokens over "
          f"the steps after the first (which compiles), coreset selection included; train s: every step, "
          f"evaluations not included")
    print(f"wrote {csv_path}, {png_path}, {os.path.join(args.out, 'results.jsonl')}")
    return rows
