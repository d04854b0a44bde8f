"""Fine-tune a Llama-architecture model with LoRA under backend="memtrain".

With no flags it needs no download: byte-level tokens, the English help text that ships with Python,
and a small Llama that is first pre-trained on that text (dense, exact, cached under ``runs/``) so
that the LoRA fine-tuning starts, as it would in practice, from a model that already knows the
language. Point it at your own model and text with ``--model-dir`` (a local Hugging Face model
directory) and ``--text``.

    python examples/finetune.py                                   # VeLoRA, Inductor, 300 steps
    python examples/finetune.py --activation compact --steps 100
    python examples/finetune.py --activation none --csv runs/none.csv
    python examples/finetune.py --min-seq 48 --seq 128 --regional  # lengths drawn per batch, one block graph
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time

import torch
from tqdm import tqdm

import memcompile
from memcompile import textdata
from memcompile.config import LLAMA_LINEARS


def small_llama(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      vocab_size=textdata.VOCAB, max_position_embeddings=max(args.seq, 128),
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def pretrained_base(args, tokens):
    """The small model pre-trained densely on the text (the first half of the steps' data stream),
    cached by its settings so every fine-tuning run starts from the same weights."""
    key = f"h{args.hidden}-l{args.layers}-s{args.seq}-b{args.batch}-n{args.base_steps}-seed{args.seed}"
    path = os.path.join(args.cache_dir, f"base-{key}.pt")
    torch.manual_seed(args.seed)
    model = small_llama(args)
    model.config.use_cache = False
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu"))
        return model
    data = textdata.Batches(tokens, args.seq, args.batch, seed=args.seed + 10_000)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    step_fn = torch.compile(model, backend="memtrain", options={"activation": "none", "report": False})
    for _ in tqdm(range(args.base_steps), desc="pre-training the base (once, cached)", unit="step"):
        ids = next(data)
        step_fn(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    os.makedirs(args.cache_dir, exist_ok=True)
    torch.save(model.state_dict(), path)
    torch.compiler.reset()
    return model


def build_model(args, tokens):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if args.model_dir:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    else:
        model = pretrained_base(args, tokens)
    model.config.use_cache = False
    torch.manual_seed(args.seed)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=list(LLAMA_LINEARS))
    return get_peft_model(model, lora)


def encode(args):
    text = textdata.load_text(args.text)
    if args.model_dir:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(args.model_dir)
        except Exception as e:  # a model directory without tokenizer files
            if args.byte_tokens:
                return textdata.byte_tokens(text)
            raise SystemExit(f"no usable tokenizer in {args.model_dir} ({type(e).__name__}); add its tokenizer "
                             "files, or pass --byte-tokens for a model whose vocabulary has at least 256 entries")
        return torch.tensor(tok(text)["input_ids"])
    return textdata.byte_tokens(text)


@torch.no_grad()
def evaluate(model, tokens, args, batches: int = 8) -> float:
    model.eval()
    data = textdata.Batches(tokens, args.seq, args.batch, seed=1234, split="eval")
    losses = [model(input_ids=(ids := next(data)), labels=ids).loss.item() for _ in range(batches)]
    model.train()
    return sum(losses) / len(losses)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--activation", default="velora", choices=["velora", "compact", "none"])
    ap.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager", "eager"],
                    help="'eager' runs without torch.compile (a baseline)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--velora-groups", type=int, default=16)
    ap.add_argument("--compact-rank", type=float, default=0.25)
    ap.add_argument("--model-dir", help="local Hugging Face model directory (default: a small model from a config)")
    ap.add_argument("--text", help="UTF-8 text file (default: Python's bundled help text)")
    ap.add_argument("--byte-tokens", action="store_true", help="with --model-dir: tokenize as bytes when the "
                    "directory has no tokenizer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-steps", type=int, default=400, help="dense pre-training steps of the built-in base")
    ap.add_argument("--cache-dir", default="runs", help="where the pre-trained base is cached")
    ap.add_argument("--csv", help="write step,loss rows here")
    ap.add_argument("--dump-dir", help="write the graphs before/after each pass here")
    ap.add_argument("--recompute-budget", type=float, help="memtrain recompute_budget in (0, 1]: recompute the "
                    "rest of what compression leaves saved, within each layer (exact; costs backward time)")
    ap.add_argument("--min-seq", type=int, help="draw each batch's length uniformly from [min-seq, seq] (as "
                    "padding-free or length-grouped batching gives); the number of compiles is reported")
    ap.add_argument("--regional", action="store_true", help="memcompile.compile_blocks: one compiled block for "
                    "every layer, instead of compiling the whole model")
    ap.add_argument("--fused-loss", action="store_true", help="memtrain fused_cross_entropy: the loss on the "
                    "logits in their own dtype, without an fp32 copy")
    ap.add_argument("--memory-target", help="memtrain memory_target, e.g. 2GiB or 300KiB: what a step keeps for the "
                    "backward at most; the planner recomputes (exact) the rest, or offloads it on a GPU")
    args = ap.parse_args(argv)

    tokens = encode(args)
    model = build_model(args, tokens)
    vocab = model.get_input_embeddings().num_embeddings
    if int(tokens.max()) >= vocab:
        raise SystemExit(f"token id {int(tokens.max())} does not fit the model's vocabulary of {vocab}")
    data = textdata.Batches(tokens, args.seq, args.batch, seed=args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    options = {"activation": args.activation, "compiler": args.compiler if args.compiler != "eager" else "aot_eager",
               "velora": {"num_groups": args.velora_groups}, "compact": {"rank": args.compact_rank},
               "dump_dir": args.dump_dir, "recompute_budget": args.recompute_budget,
               "fused_cross_entropy": args.fused_loss, "memory_target": args.memory_target}
    if args.min_seq is not None and not 1 < args.min_seq <= args.seq:
        raise SystemExit(f"--min-seq must be in [2, --seq={args.seq}], got {args.min_seq}")
    if args.compiler == "eager":
        step_fn = model
    elif args.regional:
        memcompile.compile_blocks(model, options)
        step_fn = model
    else:
        step_fn = torch.compile(model, backend="memtrain", options=options)
    lengths = torch.Generator().manual_seed(args.seed + 1)
    compiles_before = len(memcompile.reports())  # the cached base's pre-training compiled too
    print(f"trainable parameters: {sum(p.numel() for p in params):,} of {sum(p.numel() for p in model.parameters()):,}")

    rows, t0 = [], time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"{args.activation}/{args.compiler}", unit="step")
    for step in bar:
        ids = next(data)
        if args.min_seq is not None:
            ids = ids[:, :int(torch.randint(args.min_seq, args.seq + 1, (), generator=lengths))]
        loss = step_fn(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        rows.append((step, loss.item(), ids.numel()))
        bar.set_postfix(loss=f"{rows[-1][1]:.4f}")
        if step == 0 and args.compiler != "eager":
            print("\n" + str(memcompile.report()))
    elapsed = time.perf_counter() - t0
    if args.compiler != "eager":
        # every memtrain compile leaves a report: first shapes, recompiles for new lengths, graph breaks
        print(f"memtrain compiles: {len(memcompile.reports()) - compiles_before} graphs in {args.steps} steps")
    tail = [r[1] for r in rows[-20:]]
    print(f"final train loss (mean of last {len(tail)} steps): {sum(tail) / len(tail):.4f}")
    eval_loss = evaluate(model, tokens, args)
    tokens_seen = sum(r[2] for r in rows)
    print(f"eval loss: {eval_loss:.4f}  ({elapsed:.1f} s, {tokens_seen / elapsed:,.0f} tokens/s)")
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            csv.writer(f).writerows([("step", "loss", "tokens"), *rows])
        with open(os.path.splitext(args.csv)[0] + ".json", "w") as f:
            json.dump({"activation": args.activation, "compiler": args.compiler, "steps": args.steps,
                       "final_train_loss": sum(tail) / len(tail), "eval_loss": eval_loss}, f)


if __name__ == "__main__":
    main()
