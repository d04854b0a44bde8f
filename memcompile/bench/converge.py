"""``converge`` mode: the same model trained on real text with each setup, loss curves side by side.

Every setup starts from the same weights and sees the same batches (random windows of the text that
ships with Python, ``memcompile.textdata``, as byte tokens), with a linear warm-up then a constant
learning rate. Held-out loss is measured every ``--eval-every`` steps on fixed windows of the last 5 %
of the text, with the eager model (DyLoRA at its full rank). Writes ``losses.csv``, ``losses.png``
and ``results.jsonl`` (one line per setup, the curves included).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from typing import Callable

from memcompile.bench import measure, models
from memcompile.bench.builders import Built, Options, build
from memcompile.bench.runner import Progress, run_isolated
from memcompile.bench.setups import CONVERGE_DEFAULT, SETUPS, select, unavailable
from memcompile.bench.table import fmt_num, render, status_notes

GPU_DEFAULTS = dict(model="tinyllama", seq=512, batch=8, steps=300)
CPU_DEFAULTS = dict(model="tiny", seq=64, batch=8, steps=100)
LR = 2e-3  # for setups without their own: LoRA on a random base needs a larger step than the anchors' 1e-4
EVAL_BATCHES = 4
EVAL_SEED = 1234


def _evaluate(built: Built, batches: list) -> float:
    import torch

    model = built.model
    was_training = model.training
    model.eval()
    if built.before_eval is not None:
        built.before_eval()
    with torch.no_grad():
        losses = [model(input_ids=ids, labels=ids).loss.item() for ids in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


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
    tokens = textdata.byte_tokens(textdata.load_text())
    data = textdata.Batches(tokens, opts.seq, opts.batch * built.pool_factor, seed=opts.seed)
    held = textdata.Batches(tokens, opts.seq, opts.batch, seed=EVAL_SEED, split="eval")
    held_out = [next(held).to(device) for _ in range(EVAL_BATCHES)]
    steps, every = job["steps"], job["eval_every"]
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(built.optimizer, lambda s: min(1.0, (s + 1) / warmup))
    losses: list[float] = []
    times: list[float] = []
    evals: list[tuple[int, float]] = [(0, _evaluate(built, held_out))]
    with built.context:
        for step in range(1, steps + 1):
            progress(f"step {step}/{steps}")
            ids = next(data).to(device)
            with measure.timed(device, times):
                loss = built.step(ids)
            losses.append(loss.item())
            sched.step()
            if step % every == 0 or step == steps:
                evals.append((step, _evaluate(built, held_out)))
    # Steps after the first, which compiles: the first step's time is reported on its own.
    steady = times[1:] or times
    return dict(device=device.type, dtype=str(dtype).removeprefix("torch."), compiler=built.compiler, lr=lr,
                model=opts.model, seq=opts.seq, batch=opts.batch, steps=steps, first_step_s=round(times[0], 2),
                train_s=round(sum(times), 2), tok_per_s=round(len(steady) * opts.batch * opts.seq / sum(steady), 1),
                losses=losses, evals=evals, trainable=sum(p.numel() for p in built.params))


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setup", "step", "train_loss", "eval_loss"])
        for r in rows:
            if r["status"] != "ok":
                continue
            evals = dict(r["evals"])
            if 0 in evals:
                w.writerow([r["setup"], 0, "", f"{evals[0]:.5f}"])
            for step, loss in enumerate(r["losses"], 1):
                w.writerow([r["setup"], step, f"{loss:.5f}", f"{evals[step]:.5f}" if step in evals else ""])


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
    ax_train.set(title="train loss" + (f" (mean of the last {window} steps)" if window > 1 else ""), xlabel="step", ylabel="cross-entropy (nats/byte)")
    ax_eval.set(title="held-out loss", xlabel="step")
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


def columns(status: Callable[[dict], str]) -> list:
    return [
        ("setup", lambda r: r["setup"]),
        ("status", status),
        ("compiler", _ok(lambda r: r["compiler"])),
        ("lr", _ok(lambda r: f"{r['lr']:g}")),
        ("first loss", _ok(lambda r: fmt_num(r["losses"][0], 4))),
        ("last loss (mean last 10%)", _ok(lambda r: fmt_num(_tail_mean(r["losses"]), 4))),
        ("held-out start", _ok(lambda r: fmt_num(r["evals"][0][1], 4))),
        ("held-out end", _ok(lambda r: fmt_num(r["evals"][-1][1], 4))),
        ("tok/s", _ok(lambda r: fmt_num(r["tok_per_s"], 0))),
        ("1st step s", _ok(lambda r: fmt_num(r["first_step_s"], 1))),
        ("train s", _ok(lambda r: fmt_num(r["train_s"], 1))),
    ]


def main(args) -> list[dict]:
    device = models.default_device()
    cuda = device.type == "cuda"
    for key, value in (GPU_DEFAULTS if cuda else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
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
    progress = Progress(len(setups))
    rows = []
    for setup in setups:
        reason = unavailable(setup)
        if reason is not None:
            progress.start(setup.name)
            row = {"setup": setup.name, "status": f"unavailable: {reason}"}
            progress.done(row["status"])
        else:
            job = {"mode": "converge", "setup": setup.name, "options": dataclasses.asdict(opts),
                   "steps": args.steps, "eval_every": every, "lr": args.lr}
            row = run_isolated(job, progress, timeout=args.timeout)
        rows.append(row)
    csv_path, png_path = os.path.join(args.out, "losses.csv"), os.path.join(args.out, "losses.png")
    write_csv(rows, csv_path)
    plot(rows, png_path, title)
    with open(os.path.join(args.out, "results.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    status, notes = status_notes(rows)
    print()
    print(render(rows, columns(status)))
    if notes:
        print("\n" + "\n".join(notes))
    print(f"\nheld-out loss: mean of {EVAL_BATCHES} fixed batches from the last 5% of the text, eager model "
          f"(DyLoRA at full rank); loss in nats per byte (ln 256 = {math.log(256):.2f} is a uniform guess); "
          f"tok/s: trained tokens over the steps after the first (which compiles); train s: every step, "
          f"evaluations not included")
    print(f"wrote {csv_path}, {png_path}, {os.path.join(args.out, 'results.jsonl')}")
    return rows
