"""FSDP2 (``fully_shard``) on two CPU processes (gloo), against one process.

The distributed part runs this file under torchrun (``_worker``): a ``memcompile.prepare``d tiny Llama,
``fully_shard`` per decoder layer and then the root, trains under memtrain (VeLoRA, aot_eager),
compiled block by block (``compile_blocks``) and as a whole model. One process replays the same
steps as two data-parallel processes would (each batch with its process's own compression state,
gradients averaged): losses and LoRA gradients agree. The NF4 codes are sharded (each process holds
half of their bytes), and a ``torch.distributed.checkpoint`` round trip restores the NF4 state bit for
bit, the adapters, the optimizer and the compression state, so the next loss is the same.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
OPTIONS = {"compiler": "aot_eager", "activation": "velora"}
ARGS = ["--hidden", "64", "--layers", "2", "--seq", "16", "--batch", "2", "--steps", str(STEPS), "--lr", "0.01",
        "--r-max", "4", "--b-std", "0.05", "--options", json.dumps(OPTIONS)]
MODES = ("blocks", "model")


def _example():
    spec = importlib.util.spec_from_file_location("example_fsdp2", os.path.join(ROOT, "examples", "fsdp2_finetune.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compressed_layers() -> int:
    import memcompile

    return sum(len(e["layers"]) for g in memcompile.reports() if not g.inference
               for e in g.passes.get("activation_compression", {}).get("rewritten", []))


# --- the NF4 layer's state as FSDP2 sees it (one process) -------------------------------------------


def test_nf4_uint8_state_is_frozen_parameters():
    """The codes and the double-quant absmax are frozen uint8 parameters (FSDP2 shards parameters, not
    buffers); the fp32 tables stay buffers (FSDP2's mixed precision would cast floating parameters).
    Optimizers built from the trainable parameters, and Fira's groups, see only the adapters."""
    import memcompile
    from memcompile.optim.fira import fira_param_groups
    from memcompile.quant.nf4.module import NF4Linear
    from tests import models

    model = memcompile.prepare(models.tiny_llama(), {"lora": {"r_max": 4}})
    layer = model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, NF4Linear)
    params = dict(layer.named_parameters())
    assert set(params) == {"weight", "weight_absmax"}
    assert all(p.dtype == torch.uint8 and not p.requires_grad for p in params.values())
    assert {n for n, _ in layer.named_buffers()} == {"weight_quant_map", "weight_nested_absmax",
                                                     "weight_nested_quant_map", "weight_nested_offset"}
    keys = set(layer.state_dict())
    assert keys == {"weight", "weight_absmax", "weight_quant_map", "weight_nested_absmax", "weight_nested_quant_map",
                    "weight_nested_offset"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    groups = fira_param_groups(model, rank=2)
    assert all(p.is_floating_point() and p.requires_grad for g in groups for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(trainable)

    # A module-wide dtype cast moves the state but keeps the parameter objects and their dtypes.
    before = {n: p for n, p in layer.named_parameters()}
    w = layer.dequantize(torch.float32)
    model.to(torch.bfloat16)
    assert all(layer.get_parameter(n) is p and p.dtype == torch.uint8 for n, p in before.items())
    assert torch.equal(layer.dequantize(torch.float32), w)
    # An optimizer over every parameter skips the frozen ones (no gradient).
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=models.batch(), labels=models.batch()).loss.backward()
    opt.step()
    assert torch.equal(layer.dequantize(torch.float32), w)


# --- two processes ------------------------------------------------------------------------------------


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _flat(tree, prefix=""):
    """Leaves of a nested state dict, by dotted path."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        a, b = _local(a), _local(b)
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _worker(out: str, ckpt: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import memcompile

    ex = _example()
    dist.init_process_group("gloo")
    rank, world, cpu = dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    result = {"world": world}
    for mode in MODES:
        args = ex.parse_args([*ARGS, "--compile", mode])
        before = _compressed_layers()
        model = ex.shard(ex.build(args), cpu)
        step_fn = ex.compile_model(args, model)
        opt = ex.make_optimizer(args, model)
        data = ex.batches(args, rank)
        losses, grads = ex.train(args, model, step_fn, opt, data, cpu, STEPS)
        nbytes = [None] * world
        dist.all_gather_object(nbytes, ex.nf4_bytes(model))
        activation = memcompile.activation_state.state_dict(model)
        r = {"losses": losses, "grads": {n: g.tolist() for n, g in grads.items()}, "nf4_bytes": nbytes,
             "compressed": _compressed_layers() - before, "activation_layers": sorted(activation)}
        if mode == "blocks":
            # The DCP round trip, into a model with other NF4 codes and adapters (another seed).
            ex.save(ckpt, model, opt)
            other = ex.shard(ex.build(args, seed=args.seed + 7), cpu)
            other_fn = ex.compile_model(args, other)
            other_opt = ex.make_optimizer(args, other)
            ex.load(ckpt, other, other_opt)
            ours, theirs = model.state_dict(), other.state_dict()
            r["model_keys_equal"] = list(ours) == list(theirs)
            r["model_differs"] = [k for k in ours if not _same(ours[k], theirs[k])]
            r["nf4_keys"] = sum(k.endswith((".base_layer.weight", ".weight_absmax", ".weight_nested_absmax"))
                                for k in ours)
            o1, o2 = _flat(get_state_dict(model, opt)[1]), _flat(get_state_dict(other, other_opt)[1])
            r["optim_keys"] = len(o1)
            r["optim_differs"] = sorted(set(o1) ^ set(o2)) + [k for k in o1 if k in o2 and not _same(o1[k], o2[k])]
            a2 = memcompile.activation_state.state_dict(other)
            r["activation_differs"] = [k for k in activation if k not in a2 or not all(
                _same(activation[k][f], a2[k][f]) for f in activation[k])]
            r["velora_vectors"] = sum(s["velora_v"] is not None for s in activation.values())
            # Resume: the next two steps give the same losses from the saved state as from the running
            # one (the second loss follows the first step's compressed gradients, so VeLoRA's vectors).
            r["next"] = ex.train(args, model, step_fn, opt, data, cpu, 2)[0]
            resumed = ex.batches(args, rank)
            for _ in range(STEPS):  # the batches the saved run has seen
                next(resumed)
            r["next_resumed"] = ex.train(args, other, other_fn, other_opt, resumed, cpu, 2)[0]
        result[mode] = r
    result["fira"] = _fira_worker(ex, rank, cpu)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


FIRA_WEIGHTS = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight")


def _fira_run(ex, data, step_fn, model, world=1):
    """Full fine-tuning with Fira on the Linear weights of attention and MLP (AdamW elsewhere)."""
    from memcompile.optim.fira import Fira, fira_param_groups

    opt = Fira(fira_param_groups(model, rank=4, update_proj_gap=2), lr=1e-2)
    losses = []
    for _ in range(STEPS):
        ids = next(data)
        loss = step_fn(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _fira_worker(ex, rank, cpu):
    """Fira under FSDP2: the losses and weights of three steps (projector refreshed at the third); and
    the refusal of a gradient that VeLoRA approximates."""
    import torch.distributed as dist

    import memcompile

    args = ex.parse_args([*ARGS, "--compile", "blocks"])
    model = ex.shard(ex.small_llama(args.hidden, args.layers, args.seq, seed=args.seed), cpu)
    memcompile.compile_blocks(model, {"compiler": "aot_eager", "activation": "none"})
    losses = _fira_run(ex, ex.batches(args, rank), model, model)
    means = []
    for loss in losses:
        t = torch.tensor(loss)
        dist.all_reduce(t)
        means.append(t.item() / dist.get_world_size())
    weights = {n: p.full_tensor().tolist() for n, p in model.named_parameters() if n in FIRA_WEIGHTS}

    approx = ex.shard(ex.small_llama(args.hidden, args.layers, args.seq, seed=args.seed), cpu)
    memcompile.compile_blocks(approx, {"compiler": "aot_eager", "activation": "velora"})
    try:
        _fira_run(ex, ex.batches(args, rank), approx, approx)
        refusal = None
    except ValueError as e:
        refusal = str(e)
    return {"losses": means, "weights": weights, "refusal": refusal}


def _one_process(ex, mode: str, world: int):
    """The steps of ``world`` data-parallel processes replayed in one: each process's batch, with that
    process's own compression state, its loss over ``world`` backpropagated, the gradients summed."""
    import memcompile
    from memcompile import activation_state

    args = ex.parse_args([*ARGS, "--compile", mode])
    model = ex.build(args)
    before = _compressed_layers()
    step_fn = ex.compile_model(args, model)
    opt = ex.make_optimizer(args, model)
    streams = [ex.batches(args, r) for r in range(world)]
    states = [{} for _ in range(world)]
    losses, grads = [], {}
    for step in range(STEPS):
        total = 0.0
        for r in range(world):
            activation_state.load_state_dict(model, states[r])
            ids = next(streams[r])
            loss = step_fn(input_ids=ids, labels=ids).loss
            (loss / world).backward()
            total += loss.item() / world
            states[r] = activation_state.state_dict(model)
        if step == STEPS - 1:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    nf4 = [m for m in model.modules() if isinstance(m, memcompile.quant.QuantizedLinear)]
    sharded = sum(p.numel() for m in nf4 for n, p in m.named_parameters() if n != "bias")
    replicated = sum(b.numel() * b.element_size() for m in nf4 for b in m.buffers())
    return losses, grads, (sharded, replicated), _compressed_layers() - before


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    out = tmp / "fsdp.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.abspath(__file__), str(out), str(tmp / "ckpt")]
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", MODES)
def test_fsdp2_trains_like_one_process(fsdp_run, mode):
    """Losses and the last step's adapter gradients equal the one-process replay's. The gradients are
    reduce-scattered (summed over the processes, then divided), where the replay accumulates each
    process's loss / 2: the same sums, grouped otherwise. With two processes (halving is exact) they
    come out bit-identical here; the tolerance allows the fp32 round-off of the largest gradient that
    another grouping (more processes, NCCL's reduction order) would add."""
    run = fsdp_run[mode]
    losses, grads, (sharded_total, replicated), compressed = _one_process(_example(), mode, fsdp_run["world"])
    assert run["compressed"] == compressed > 0, (run["compressed"], compressed)
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    assert set(run["grads"]) == set(grads) and all(n.endswith((".lora_A", ".lora_B")) for n in grads)
    scale = max(g.abs().max().item() for g in grads.values())
    for n, g in grads.items():
        torch.testing.assert_close(torch.tensor(run["grads"][n]), g, rtol=1e-4, atol=1e-5 * scale, msg=n)
    assert any(g[:].abs().sum() > 0 for n, g in grads.items() if n.endswith(".lora_A"))  # compressed ones

    # Each process holds half of the uint8 NF4 state (codes, double-quant absmax) and all of the fp32
    # tables (1 KiB a layer, plus the nested absmax: a large share only of a model this small).
    per_rank = run["nf4_bytes"]
    assert sum(r["sharded"] for r in per_rank) == sharded_total
    for r in per_rank:
        assert abs(r["sharded"] - sharded_total / 2) <= 0.01 * sharded_total
        assert r["replicated"] == replicated and r["total"] == sharded_total + replicated
    # The compression state is kept across steps and found by activation_state.state_dict.
    assert len(run["activation_layers"]) == 3 * 2  # q/k/v, gate/up, and down's input, in each layer


def test_fira_under_fsdp2(fsdp_run):
    """Fira's sharded step (gradient all-gathered, the same update on every process, each applying its
    rows) equals one process's Fira on both processes' batches; without compression the averaged
    gradient is the whole batch's, up to round-off, which the projector's SVD passes on."""
    import memcompile

    ex, world = _example(), fsdp_run["world"]
    run = fsdp_run["fira"]
    args = ex.parse_args([*ARGS, "--compile", "blocks"])
    model = ex.small_llama(args.hidden, args.layers, args.seq, seed=args.seed)
    memcompile.compile_blocks(model, {"compiler": "aot_eager", "activation": "none"})
    streams = [ex.batches(args, r) for r in range(world)]
    data = iter(lambda: torch.cat([next(s) for s in streams]), None)
    losses = _fira_run(ex, data, model, model)
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    for n in FIRA_WEIGHTS:
        torch.testing.assert_close(torch.tensor(run["weights"][n]), model.get_parameter(n).detach(),
                                   rtol=1e-4, atol=1e-5, msg=n)
    assert run["refusal"] is not None and "Fira needs the exact weight gradient" in run["refusal"]


@pytest.mark.slow
def test_fsdp2_inductor(fsdp_run, tmp_path):
    """The default compiler: the example under torchrun, block by block with Inductor, trains as the
    aot_eager run does (other kernels, so fp32 round-off apart)."""
    out = tmp_path / "inductor.json"
    options = {k: v for k, v in OPTIONS.items() if k != "compiler"}
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    args = [*ARGS[:ARGS.index("--options")], "--options", json.dumps(options), "--compile", "blocks", "--out", str(out)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "examples", "fsdp2_finetune.py"), *args]
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    losses = json.loads(out.read_text())["losses"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(fsdp_run["blocks"]["losses"]), rtol=1e-4, atol=1e-5)


def test_fsdp2_checkpoint_round_trip(fsdp_run):
    run = fsdp_run["blocks"]
    assert run["model_keys_equal"] and run["nf4_keys"] >= 2 * 14
    assert run["model_differs"] == []  # NF4 codes and state bit-identical, adapters equal
    assert run["optim_keys"] > 0 and run["optim_differs"] == []
    assert run["velora_vectors"] == 6 and run["activation_differs"] == []
    assert run["next_resumed"] == run["next"]


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
