"""CoLM coresets vs random half-batches vs full batches: a small convergence run on CPU.

Data: the Python standard library's source files, one source per package (sizes differ ~50x), as
byte-level tokens (vocab 256). A tiny random Llama trains for the same number of steps on:

- ``full``: the whole pool of ``--pool`` examples per step;
- ``random``: a uniformly random ``--ratio`` of each pool;
- ``coreset``: the CoLM coreset of each pool (fresh perturbation direction per step);
- ``coreset-fixed``: the same with the official fixed direction.

Every method sees the same pools and starts from the same weights. Held-out loss is reported pooled
(weighted by source size, like the training stream) and source-balanced (mean over sources).
Memory: bytes of activations saved for backward in a training step (unique storages, counted with
``torch.autograd.graph.saved_tensors_hooks``) and, on CUDA, ``torch.cuda.max_memory_allocated``.

    python examples/coreset_finetune.py --out /tmp/coreset_run
"""
from __future__ import annotations

import argparse
import csv
import math
import pathlib
import sysconfig
import time
from contextlib import contextmanager

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from memcompile.data import CoresetConfig, CoresetSelector, per_example_causal_lm_loss, weighted_causal_lm_loss

DEFAULT_PACKAGES = ("asyncio", "email", "unittest", "json", "zoneinfo", "tomllib", "sqlite3")


def load_sources(packages, seq_len, heldout_frac, heldout_cap):
    """Non-overlapping byte chunks per package: ``(train, heldout)`` lists of ``(tensor, source)``.

    The last ``heldout_frac`` of each package's chunks (at most ``heldout_cap``) is held out.
    """
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    train, heldout, sizes = [], [], {}
    for source, name in enumerate(packages):
        files = sorted(f for f in (root / name).rglob("*.py") if "test" not in f.relative_to(root).parts[1:])
        data = torch.frombuffer(bytearray(b"".join(f.read_bytes() for f in files)), dtype=torch.uint8)
        chunks = data[: len(data) // seq_len * seq_len].view(-1, seq_len).long()
        n_held = min(heldout_cap, max(1, int(len(chunks) * heldout_frac)))
        train += [(c, source) for c in chunks[:-n_held]]
        heldout += [(c, source) for c in chunks[-n_held:]]
        sizes[name] = len(chunks)
    return train, heldout, sizes


def make_batch(rows):
    ids = torch.stack([r[0] for r in rows])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "sources": torch.tensor([r[1] for r in rows])}


@contextmanager
def saved_activation_bytes(record):
    """Adds to ``record['bytes']`` the size of the unique storages autograd saves inside."""
    seen = set()

    def pack(t):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            record["bytes"] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def evaluate(model, heldout, n_sources, batch_size=64):
    """Per-source mean held-out loss."""
    totals, counts = torch.zeros(n_sources, dtype=torch.float64), torch.zeros(n_sources, dtype=torch.float64)
    model.eval()
    with torch.inference_mode():
        for lo in range(0, len(heldout), batch_size):
            batch = make_batch(heldout[lo : lo + batch_size])
            device = next(model.parameters()).device
            ids = batch["input_ids"].to(device)
            losses = per_example_causal_lm_loss(model(input_ids=ids).logits, ids).double().cpu()
            totals.index_add_(0, batch["sources"], losses)
            counts.index_add_(0, batch["sources"], torch.ones_like(losses))
    model.train()
    return totals / counts


def run(method, args, train, heldout, weights, model_config, device):
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(model_config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    )
    selector = None
    if method.startswith("coreset"):
        selector = CoresetSelector(
            CoresetConfig(
                ratio=args.ratio,
                param_name=f"model.layers.{model_config.num_hidden_layers - 1}.self_attn.v_proj.weight",
                fixed_direction=method == "coreset-fixed",
                seed=args.seed,
            )
        )
    pools = torch.Generator().manual_seed(args.seed + 1)  # same pools for every method
    halves = torch.Generator().manual_seed(args.seed + 2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows, saved, select_time, start = [], 0, 0.0, time.perf_counter()
    for step in tqdm(range(args.steps + 1), desc=method, leave=False):
        if step % args.eval_every == 0 or step == args.steps:
            per_source = evaluate(model, heldout, len(weights))
            rows.append(
                {
                    "method": method,
                    "step": step,
                    "heldout_loss": float((per_source * weights).sum()),
                    "balanced_loss": float(per_source.mean()),
                    **{f"loss_{s}": float(v) for s, v in enumerate(per_source)},
                }
            )
        if step == args.steps:
            break
        pool = make_batch([train[i] for i in torch.randint(len(train), (args.pool,), generator=pools).tolist()])
        pool = {k: v.to(device) for k, v in pool.items()}
        t0 = time.perf_counter()
        if method == "full":
            batch = pool
        elif method == "random":
            keep = torch.randperm(args.pool, generator=halves)[: max(1, int(args.ratio * args.pool))].to(device)
            batch = {k: v[keep] for k, v in pool.items()}
        else:
            batch = selector.select(model, pool)
        select_time += time.perf_counter() - t0
        record = {"bytes": 0}
        with saved_activation_bytes(record):
            loss, _ = weighted_causal_lm_loss(model, batch)
        saved = max(saved, record["bytes"])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    summary = {
        "method": method,
        "final_heldout": rows[-1]["heldout_loss"],
        "final_balanced": rows[-1]["balanced_loss"],
        "saved_activation_MiB": saved / 2**20,
        "seconds": time.perf_counter() - start,
        "selection_seconds": select_time,
    }
    if device.type == "cuda":
        summary["cuda_max_allocated_MiB"] = torch.cuda.max_memory_allocated(device) / 2**20
    return rows, summary


def plot(rows, methods, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (("heldout_loss", "held-out (pooled)"), ("balanced_loss", "held-out (source-balanced)"))
    for ax, (key, title) in zip(axes, panels):
        for method in methods:
            # Step 0 (ln 256 for every method) would squash the interesting range.
            pts = [(r["step"], r[key]) for r in rows if r["method"] == method and r["step"] > 0]
            ax.plot(*zip(*pts), label=method)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/byte)")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packages", nargs="+", default=list(DEFAULT_PACKAGES))
    parser.add_argument("--methods", nargs="+", default=["full", "random", "coreset", "coreset-fixed"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--pool", type=int, default=32, help="examples per large batch")
    parser.add_argument("--ratio", type=float, default=0.5, help="coreset / random fraction of the pool")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--heldout-frac", type=float, default=0.05)
    parser.add_argument("--heldout-cap", type=int, default=48, help="held-out chunks per source at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("coreset_finetune_out"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train, heldout, sizes = load_sources(args.packages, args.seq_len, args.heldout_frac, args.heldout_cap)
    print("chunks per source:", sizes)
    counts = torch.tensor([sizes[p] for p in args.packages], dtype=torch.float64)
    weights = counts / counts.sum()
    model_config = LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=False,
    )

    args.out.mkdir(parents=True, exist_ok=True)
    all_rows, summaries = [], []
    for method in args.methods:
        rows, summary = run(method, args, train, heldout, weights, model_config, device)
        all_rows += rows
        summaries.append(summary)
        print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))

    with open(args.out / "curves.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(all_rows[0]))
        writer.writeheader()
        writer.writerows(all_rows)
    with open(args.out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summaries[0]))
        writer.writeheader()
        writer.writerows(summaries)
    plot(all_rows, args.methods, args.out / "curves.png")
    print(f"wrote {args.out / 'curves.csv'}, {args.out / 'summary.csv'}, {args.out / 'curves.png'}")


if __name__ == "__main__":
    main()
