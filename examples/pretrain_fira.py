"""Pre-train a tiny byte-level Llama from scratch with AdamW, GaLore and Fira at the same rank.

The corpus is the Python standard library's own ``.py`` source (ships with every Python, no download).
GaLore is ``Fira(residual=False)``: same projector, moments and rank, no residual. Every run starts from
the same initial weights and sees the same batches. Writes into ``--out``:

- ``losses.csv``: ``optimizer,step,lr,train_loss,eval_loss`` (``eval_loss`` every ``--eval-every`` steps)
- ``summary.csv``: final eval loss, optimizer-state bytes (all params / Fira-managed params), seconds
- ``losses.png``: train loss (moving average) and eval loss per optimizer

Example (defaults: about 6 minutes on 2 idle CPU cores, 3 x ~110 s; longer when the cores are shared)::

    python examples/pretrain_fira.py --out runs/pretrain_fira
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sysconfig
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from memcompile.optim import Fira, fira_param_groups

OPTIMIZERS = ("adamw", "galore", "fira")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/pretrain_fira")
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--warmup", type=int, default=60, help="linear warmup steps, then cosine to 10%% of lr")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=352)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--update-proj-gap", type=int, default=200)
    ap.add_argument("--alpha", type=float, default=0.25)
    ap.add_argument("--lr-adamw", type=float, default=1.5e-3,
                    help="best of {7.5e-4, 1.5e-3, 3e-3, 6e-3} on the default setup")
    ap.add_argument("--lr-lowrank", type=float, default=1e-2, help="lr of GaLore and Fira (paper: 0.01)")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--corpus-mb", type=float, default=4.0, help="bytes of stdlib source to use, in MB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return ap.parse_args()


def stdlib_bytes(limit: int) -> torch.Tensor:
    """The stdlib's ``.py`` files (tests and IDLE left out) in sorted order, as one byte tensor."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorted and pruned in place so the corpus is the same on every run.
        dirnames[:] = sorted(d for d in dirnames if d not in {"test", "tests", "idlelib", "site-packages",
                                                               "__pycache__"})
        for name in sorted(filenames):
            if name.endswith(".py") and total < limit:
                data = (Path(dirpath) / name).read_bytes()
                chunks.append(data)
                total += len(data)
    blob = b"\n".join(chunks)[:limit]
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).long()


def batches(data: torch.Tensor, n: int, batch_size: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq_len, (n, batch_size), generator=gen)
    offsets = torch.arange(seq_len)
    return [data[s[:, None] + offsets] for s in starts]


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def state_bytes(opt: torch.optim.Optimizer, params=None) -> int:
    """Bytes of the optimizer's state tensors (torch's scalar ``step`` tensors left out)."""
    if isinstance(opt, Fira):
        return opt.state_bytes(params)
    chosen = opt.state.keys() if params is None else params
    return sum(v.numel() * v.element_size() for p in chosen for k, v in opt.state.get(p, {}).items()
               if isinstance(v, torch.Tensor) and k != "step")


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, data: list[torch.Tensor]) -> float:
    model.eval()
    loss = sum(model(input_ids=x, labels=x).loss.item() for x in data) / len(data)
    model.train()
    return loss


def build_optimizer(name: str, model: LlamaForCausalLM, args: argparse.Namespace):
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.lr_adamw, betas=(0.9, 0.999), eps=1e-6,
                                 weight_decay=0.0)
    groups = fira_param_groups(model, rank=args.rank, update_proj_gap=args.update_proj_gap, alpha=args.alpha,
                               residual=(name == "fira"))
    return Fira(groups, lr=args.lr_lowrank)


def train(name: str, args, config: LlamaConfig, train_data, eval_data, writer) -> dict:
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    opt = build_optimizer(name, model, args)
    base_lrs = [g["lr"] for g in opt.param_groups]
    fira_params = [p for g in fira_param_groups(model, rank=args.rank) if g["rank"] is not None for p in g["params"]]
    start = time.perf_counter()
    eval_loss = float("nan")
    bar = tqdm(enumerate(train_data), total=len(train_data), desc=name, dynamic_ncols=True)
    for step, x in bar:
        factor = lr_factor(step, args.warmup, args.steps)
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * factor
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        last = step + 1 == args.steps
        row_eval = ""
        if (step + 1) % args.eval_every == 0 or last:
            eval_loss = evaluate(model, eval_data)
            row_eval = f"{eval_loss:.5f}"
        writer.writerow([name, step + 1, f"{base_lrs[0] * factor:.6g}", f"{loss.item():.5f}", row_eval])
        bar.set_postfix(loss=f"{loss.item():.3f}", eval=f"{eval_loss:.3f}")
    return {
        "optimizer": name,
        "final_eval_loss": eval_loss,
        "state_bytes_total": state_bytes(opt),
        "state_bytes_targeted": state_bytes(opt, fira_params),
        "targeted_numel": sum(p.numel() for p in fira_params),
        "seconds": time.perf_counter() - start,
    }


def plot(out: Path, names: list[str], smooth: int = 20) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(out / "losses.csv")))
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        mine = [r for r in rows if r["optimizer"] == name]
        losses = torch.tensor([float(r["train_loss"]) for r in mine])
        kernel = torch.ones(smooth) / smooth
        avg = torch.nn.functional.conv1d(losses.view(1, 1, -1), kernel.view(1, 1, -1)).flatten()
        ax_train.plot(range(smooth, len(losses) + 1), avg.tolist(), label=name)
        evals = [(int(r["step"]), float(r["eval_loss"])) for r in mine if r["eval_loss"]]
        ax_eval.plot(*zip(*evals), marker="o", markersize=3, label=name)
    ax_train.set(title=f"train loss ({smooth}-step mean)", xlabel="step", ylabel="cross-entropy (nats/byte)")
    ax_eval.set(title="held-out loss", xlabel="step")
    for ax in (ax_train, ax_eval):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=120)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = stdlib_bytes(int(args.corpus_mb * 1e6))
    split = int(0.95 * data.numel())   # the last 5 % of the corpus is held out
    train_data = batches(data[:split], args.steps, args.batch_size, args.seq_len, seed=args.seed)
    eval_data = batches(data[split:], args.eval_batches, args.batch_size, args.seq_len, seed=args.seed + 1)
    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=args.seq_len,
                         tie_word_embeddings=False)
    print(f"corpus: {data.numel() / 1e6:.2f} MB of stdlib source; "
          f"model: {sum(p.numel() for p in LlamaForCausalLM(config).parameters()) / 1e6:.2f} M params")

    results = []
    with open(out / "losses.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["optimizer", "step", "lr", "train_loss", "eval_loss"])
        for name in args.optimizers:
            results.append(train(name, args, config, train_data, eval_data, writer))
            f.flush()

    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    plot(out, args.optimizers)

    print(f"{'optimizer':>9} {'eval loss':>10} {'state MB':>9} {'targeted MB':>12} {'seconds':>8}")
    for r in results:
        print(f"{r['optimizer']:>9} {r['final_eval_loss']:10.4f} {r['state_bytes_total'] / 1e6:9.3f} "
              f"{r['state_bytes_targeted'] / 1e6:12.3f} {r['seconds']:8.1f}")
    print(f"wrote {out / 'losses.csv'}, {out / 'summary.csv'}, {out / 'losses.png'}")


if __name__ == "__main__":
    main()
