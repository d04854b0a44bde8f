"""FSDP2 (``fully_shard``) training of a ``memcompile.prepare``d model (NF4 base + dynamic-rank LoRA)
under backend="memtrain", with a sharded ``torch.distributed.checkpoint`` at the end.

    torchrun --nproc-per-node 2 examples/fsdp2_finetune.py              # gloo on CPU, NCCL on GPUs
    torchrun --nproc-per-node 2 examples/fsdp2_finetune.py --compile model --options '{"activation": "compact"}'
    torchrun --nproc-per-node 8 examples/fsdp2_finetune.py --hidden 1024 --layers 8 --checkpoint runs/fsdp2

Prepare the model first (the NF4 codes and their uint8 absmax are frozen parameters, so
``fully_shard`` shards them: each process holds 1/world of them and all-gathers the packed bytes
for the forward and the backward), then ``fully_shard`` each decoder layer and the root, then compile:
``memcompile.compile_blocks`` (one graph for every layer) or ``torch.compile`` of the whole model.
With no flags: a small random Llama on the help text that ships with Python.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import memcompile
from memcompile import textdata
from memcompile.lora import lora_layers
from memcompile.quant import QuantizedLinear

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trainer_finetune import small_llama  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--options", default="{}", help="memtrain's options, JSON")
    p.add_argument("--activation", default="velora", choices=["velora", "compact", "none"])
    p.add_argument("--compile", default="blocks", choices=["blocks", "model", "none"],
                   help="memcompile.compile_blocks, torch.compile of the whole model, or eager")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=2, help="per process")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--r-max", type=int, default=8)
    p.add_argument("--b-std", type=float, default=0.0,
                   help="start LoRA B at N(0, b_std) instead of zero (so A has gradients from the first step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", help="save a sharded DCP checkpoint (model, optimizer, compression state) here")
    p.add_argument("--out", help="rank 0 writes losses, last adapter gradients and NF4 bytes per rank here (JSON)")
    return p.parse_args(argv)


def options(args) -> dict:
    return {"activation": args.activation, **json.loads(args.options)}


def batches(args, rank: int):
    """This process's batches: its own stream of windows of the bundled text."""
    return textdata.Batches(textdata.byte_tokens(textdata.default_corpus()), args.seq, args.batch,
                            seed=args.seed + 1000 * rank)


def build(args, seed: int | None = None) -> torch.nn.Module:
    """The prepared model, the same on every process (same seed)."""
    model = small_llama(args.hidden, args.layers, args.seq, seed=args.seed if seed is None else seed)
    model = memcompile.prepare(model, {"lora": {"r_max": args.r_max, "alpha": 2.0 * args.r_max}})
    if args.b_std:
        g = torch.Generator().manual_seed(args.seed + 1)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * args.b_std)
    return model


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2: one group per decoder layer, then the root (embeddings, final norm, output projection)."""
    mesh = dist.device_mesh.init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def compile_model(args, model):
    if args.compile == "blocks":
        memcompile.compile_blocks(model, options(args))
        return model
    if args.compile == "model":
        return torch.compile(model, backend="memtrain", options=options(args))
    return model


def make_optimizer(args, model):
    # The frozen parameters (the NF4 codes among them) are left out; they would get no gradient anyway.
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=args.lr) if args.optimizer == "sgd" else torch.optim.AdamW(params, lr=args.lr)


def local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def nf4_bytes(model) -> dict:
    """This process's bytes of NF4 state: sharded (frozen parameters) and replicated (buffers), and the
    whole model's NF4 bytes for comparison."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    return {"sharded": sum(local_bytes(p) for m in layers for n, p in m.named_parameters() if n != "bias"),
            "replicated": sum(local_bytes(b) for m in layers for b in m.buffers()),
            "total": sum(m.nbytes for m in layers)}


def train(args, model, step_fn, opt, data, device, steps: int):
    """``steps`` steps; returns the mean losses over the processes and the last step's adapter gradients."""
    world = dist.get_world_size()
    losses, grads = [], {}
    for step in range(steps):
        ids = next(data).to(device)
        loss = step_fn(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == steps - 1:  # FSDP2 holds the reduce-scattered (averaged) shard of each gradient
            grads = {n: p.grad.full_tensor().cpu() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        if dist.get_rank() == 0:
            print(f"step {len(losses)}: loss {losses[-1]:.4f}", flush=True)
    return losses, grads


def save(path, model, opt):
    """Model and optimizer as sharded DCP state; the compression state in a file per process, as each
    process has its own (VeLoRA's vector is estimated from its own batches)."""
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    activation = memcompile.activation_state.state_dict(model)  # collective under FSDP2
    torch.save(activation, os.path.join(path, f"activation_rank{dist.get_rank()}.pt"))
    dist.barrier()


def load(path, model, opt):
    """What ``save`` wrote, into a model sharded and an optimizer built as the saved ones were (the
    same number of processes)."""
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    activation = torch.load(os.path.join(path, f"activation_rank{dist.get_rank()}.pt"))
    memcompile.activation_state.load_state_dict(model, activation)


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model = shard(build(args).to(device), device)
    step_fn = compile_model(args, model)
    opt = make_optimizer(args, model)
    losses, grads = train(args, model, step_fn, opt, batches(args, rank), device, args.steps)
    nbytes = [None] * dist.get_world_size()
    dist.all_gather_object(nbytes, nf4_bytes(model))
    if rank == 0:
        print("NF4 bytes per process:", nbytes, flush=True)
    if args.checkpoint:
        save(args.checkpoint, model, opt)
        if rank == 0:
            print(f"saved a sharded checkpoint to {args.checkpoint}", flush=True)
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"losses": losses, "world": dist.get_world_size(), "nf4_bytes": nbytes,
                       "grads": {n: g.tolist() for n, g in grads.items()}}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
