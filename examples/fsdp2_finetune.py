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
from memcompile.lora import lora_layers
from memcompile.quant import QuantizedLinear

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_common import batches, init, make_optimizer, mean_loss, options, parser  # noqa: E402
from trainer_finetune import small_llama  # noqa: E402


def parse_args(argv=None):
    p = parser(__doc__, activation="velora", layers=2, batch=2, steps=10)
    p.add_argument("--compile", default="blocks", choices=["blocks", "model", "none"],
                   help="memcompile.compile_blocks, torch.compile of the whole model, or eager")
    p.add_argument("--r-max", type=int, default=8)
    p.add_argument("--b-std", type=float, default=0.0,
                   help="start LoRA B at N(0, b_std) instead of zero (so A has gradients from the first step)")
    p.add_argument("--checkpoint", help="save a sharded DCP checkpoint (model, optimizer, compression state) here")
    p.add_argument("--out", help="rank 0 writes losses, last adapter gradients and NF4 bytes per rank here (JSON)")
    return p.parse_args(argv)


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
    losses, grads = [], {}
    for step in range(steps):
        ids = next(data).to(device)
        loss = step_fn(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == steps - 1:  # FSDP2 holds the reduce-scattered (averaged) shard of each gradient
            grads = {n: p.grad.full_tensor().cpu() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(mean_loss(loss))
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
    rank, world, device = init()
    model = shard(build(args).to(device), device)
    step_fn = compile_model(args, model)
    opt = make_optimizer(args, model)
    losses, grads = train(args, model, step_fn, opt, batches(args, rank), device, args.steps)
    nbytes = [None] * world
    dist.all_gather_object(nbytes, nf4_bytes(model))
    if rank == 0:
        print("NF4 bytes per process:", nbytes, flush=True)
    if args.checkpoint:
        save(args.checkpoint, model, opt)
        if rank == 0:
            print(f"saved a sharded checkpoint to {args.checkpoint}", flush=True)
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"losses": losses, "world": world, "nf4_bytes": nbytes,
                       "grads": {n: g.tolist() for n, g in grads.items()}}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
