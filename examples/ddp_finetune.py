"""Data-parallel training under backend="memtrain" with DDP, one process per device.

    torchrun --nproc-per-node 2 examples/ddp_finetune.py                  # gloo on CPU, NCCL on GPUs
    torchrun --nproc-per-node 8 examples/ddp_finetune.py --hidden 1024 --layers 8 --options '{"activation": "compact"}'

Wrap the model in ``DistributedDataParallel`` first, then compile the wrapper with memtrain. Dynamo
splits the graph where DDP's gradient buckets end (so each bucket's all-reduce starts while the
backward goes on); a layer cut there gets its input from the previous sub-graph as a graph input,
and memtrain compresses it like any activation (``memcompile.report()`` lists every sub-graph).
With no flags: full fine-tuning of a small random Llama on the help text that ships with Python.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

import memcompile
from memcompile import textdata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trainer_finetune import small_llama  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--options", default="{}", help="memtrain's options, JSON")
    p.add_argument("--activation", default="compact", choices=["velora", "compact", "none"])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=4, help="per process")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--bucket-mb", type=float, default=1.0,
                   help="DDP's bucket size (bucket_cap_mb); Dynamo splits the graph at every bucket")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="rank 0 writes the losses and what each sub-graph compressed here (JSON)")
    return p.parse_args(argv)


def batches(args, rank: int):
    """This process's batches: its own stream of windows of the bundled text."""
    return textdata.Batches(textdata.byte_tokens(textdata.default_corpus()), args.seq, args.batch,
                            seed=args.seed + 1000 * rank)


def options(args) -> dict:
    return {"activation": args.activation, **json.loads(args.options)}


def make_optimizer(args, model):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=args.lr) if args.optimizer == "sgd" else torch.optim.AdamW(params, lr=args.lr)


def compressed(reports) -> dict:
    """Per sub-graph: the layers compressed, and those skipped with their reason."""
    out = []
    for g in reports:
        p = g.passes.get("activation_compression", {})
        out.append({"compressed": sorted(n for e in p.get("rewritten", []) for n in e["layers"]),
                    "skipped": {s["layer"]: s["reason"] for s in p.get("skipped", [])}})
    return out


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model = small_llama(args.hidden, args.layers, args.seq, seed=args.seed).to(device)  # same weights everywhere
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if cuda else None,
                                                    bucket_cap_mb=args.bucket_mb)
    step_fn = torch.compile(ddp, backend="memtrain", options=options(args))
    opt = make_optimizer(args, model)
    data = batches(args, rank)
    losses = []
    for step in range(args.steps):
        ids = next(data).to(device)
        loss = step_fn(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step + 1}: loss {losses[-1]:.4f}", flush=True)
    if rank == 0:
        graphs = [g for g in memcompile.reports() if not g.inference]
        print(memcompile.report())
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"losses": losses, "world": world, "graphs": compressed(graphs)}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
