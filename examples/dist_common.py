"""What the DDP and FSDP2 examples share: the process group and device, their common flags, each
process's batches, memtrain's options and the optimizer."""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from memcompile import textdata


def parser(doc: str, *, activation: str, layers: int, batch: int, steps: int) -> argparse.ArgumentParser:
    """The flags both examples take, with the example's own defaults."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--options", default="{}", help="memtrain's options, JSON")
    p.add_argument("--activation", default=activation, choices=["velora", "compact", "none"])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=batch, help="per process")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--seed", type=int, default=0)
    return p


def init() -> tuple[int, int, torch.device]:
    """Join the process group (NCCL with CUDA, gloo without); returns rank, world size and this
    process's device."""
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def batches(args, rank: int):
    """This process's batches: its own stream of windows of the bundled text."""
    return textdata.Batches(textdata.byte_tokens(textdata.default_corpus()), args.seq, args.batch,
                            seed=args.seed + 1000 * rank)


def options(args) -> dict:
    return {"activation": args.activation, **json.loads(args.options)}


def make_optimizer(args, model):
    # Frozen parameters (the NF4 codes among them) are left out; they would get no gradient anyway.
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=args.lr) if args.optimizer == "sgd" else torch.optim.AdamW(params, lr=args.lr)


def mean_loss(loss: torch.Tensor) -> float:
    """``loss`` averaged over the processes."""
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return mean.item() / dist.get_world_size()
