"""QDyLoRA vs plain LoRA on CPU: one training run each, then the held-out loss at several ranks.

A tiny Llama is first pre-trained (dense) on byte-level Python source from half of the standard
library, then fine-tuned on the other half twice, at the same maximum rank:

* QDyLoRA: NF4 frozen base (double quant), one rank drawn per step from 1..r_max (DyLoRA);
* LoRA: dense frozen base, always rank r_max.

After training, both are evaluated at ranks 1, 2, 4, 8 and r_max (adapters truncated, scaled alpha/b).
DyLoRA's claim is that its single run serves every rank, where a truncated LoRA degrades.

    python examples/qdylora_parity.py --threads 1        # a few minutes on a laptop CPU
    python examples/qdylora_parity.py --steps 600 --r-max 16 --backend aot_eager
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sysconfig
import time

import torch
from tqdm import tqdm

from memcompile.adapt import prepare, quantized_layers
from memcompile.config import LLAMA_LINEARS
from memcompile.lora import RankSampler, set_rank


def stdlib_bytes(max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Python sources of the standard library as bytes: (first half of the files, second half)."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "__pycache__"))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    halves = ([], [])
    sizes = [0, 0]
    for i, path in enumerate(files):
        part = i % 2
        if sizes[part] >= max_bytes:
            continue
        with open(path, "rb") as f:
            data = f.read()
        halves[part].append(data)
        sizes[part] += len(data)
    return tuple(torch.frombuffer(bytearray(b"".join(h)[:max_bytes]), dtype=torch.uint8).long() for h in halves)


def batches(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    while True:
        start = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
        yield torch.stack([data[s: s + seq] for s in start.tolist()])


def tiny_llama(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=256, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def train(model, data, steps, lr, args, desc, sampler=None, backend="none"):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    step_fn = model if backend == "none" else torch.compile(model, backend=backend)
    gen = torch.Generator().manual_seed(args.seed)
    it = batches(data, args.batch, args.seq, gen)
    losses = []
    bar = tqdm(range(steps), desc=desc, dynamic_ncols=True)
    for _ in bar:
        if sampler is not None:
            sampler.step()  # outside the compiled graph: the rank lives in buffers
        ids = next(it)
        loss = step_fn(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    return sum(losses[-20:]) / len(losses[-20:])


@torch.no_grad()
def evaluate(model, data, args, n_batches=8):
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    it = batches(data, args.batch, args.seq, gen)
    total = 0.0
    for _ in range(n_batches):
        ids = next(it)
        total += model(input_ids=ids, labels=ids).loss.item()
    model.train()
    return total / n_batches


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps per method")
    p.add_argument("--r-max", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--bytes", type=int, default=4_000_000, help="bytes of source per half")
    p.add_argument("--backend", default="none", choices=["none", "aot_eager", "memtrain", "inductor"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is fastest on a machine whose cores are busy)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    pre_data, ft_data = stdlib_bytes(args.bytes)
    split = int(0.9 * ft_data.numel())
    ft_train, ft_eval = ft_data[:split], ft_data[split:]
    print(f"stdlib sources: {pre_data.numel() / 1e6:.1f} MB pre-training, {ft_train.numel() / 1e6:.1f} MB "
          f"fine-tuning, {ft_eval.numel() / 1e6:.2f} MB held out")

    base = tiny_llama(args.hidden, args.layers)
    t0 = time.time()
    train(base, pre_data, args.pretrain_steps, 3e-3, args, "pre-train (dense)")
    base_eval = evaluate(base, ft_eval, args)
    print(f"base model: held-out loss {base_eval:.4f} ({time.time() - t0:.0f} s)")

    ranks = sorted({r for r in (1, 2, 4, 8, args.r_max) if r <= args.r_max})
    runs = {
        "QDyLoRA": {"r_max": args.r_max, "alpha": args.alpha, "quant": "nf4", "dynamic": True, "seed": args.seed},
        "LoRA": {"r_max": args.r_max, "alpha": args.alpha, "quant": "none", "dynamic": False},
    }
    results = {}
    for name, lora in runs.items():
        torch.manual_seed(args.seed)  # same adapter initialisation for both
        model = prepare(copy.deepcopy(base), {"lora": lora})
        sampler = RankSampler(model) if lora["dynamic"] else None
        start = evaluate(model, ft_eval, args)  # B = 0: the (quantised) base alone
        t0 = time.time()
        final = train(model, ft_train, args.steps, args.lr, args, f"fine-tune {name}", sampler, args.backend)
        seconds = time.time() - t0
        per_rank = {}
        for r in ranks:
            set_rank(model, r)
            per_rank[r] = evaluate(model, ft_eval, args)
        base_bytes = sum(q["bytes_after"] for q in quantized_layers(model)) or None
        results[name] = (start, final, per_rank, seconds, base_bytes)

    dense_bytes = sum(m.weight.numel() * 4 for n, m in base.named_modules()
                      if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LLAMA_LINEARS)
    print("\nheld-out loss (nats/byte) before fine-tuning and, after one run, at each rank; "
          "train: mean training loss of the last 20 steps")
    print(f"{'method':<9} {'before':>8} {'train':>8} " + " ".join(f"{'r=' + str(r):>8}" for r in ranks)
          + f" {'time':>7} {'base weights':>14}")
    for name, (start, final, per_rank, seconds, qbytes) in results.items():
        nbytes = qbytes if qbytes else dense_bytes
        print(f"{name:<9} {start:>8.4f} {final:>8.4f} " + " ".join(f"{per_rank[r]:>8.4f}" for r in ranks)
              + f" {seconds:>6.0f}s {nbytes / 1024:>11.1f} KiB")
    print(f"(loss of a uniform byte model: {math.log(256):.4f})")


if __name__ == "__main__":
    main()
