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

import json
import os
import sys

import torch
import torch.distributed as dist

import memcompile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_common import batches, init, make_optimizer, mean_loss, options, parser  # noqa: E402
from trainer_finetune import small_llama  # noqa: E402


def parse_args(argv=None):
    p = parser(__doc__, activation="compact", layers=3, batch=4, steps=20)
    p.add_argument("--bucket-mb", type=float, default=1.0,
                   help="DDP's bucket size (bucket_cap_mb); Dynamo splits the graph at every bucket")
    p.add_argument("--out", help="rank 0 writes the losses and what each sub-graph compressed here (JSON)")
    return p.parse_args(argv)


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
    rank, world, device = init()
    model = small_llama(args.hidden, args.layers, args.seq, seed=args.seed).to(device)  # same weights everywhere
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
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
        losses.append(mean_loss(loss))
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
