"""DDP on two CPU processes (gloo), through examples/ddp_finetune.py under torchrun.

Dynamo splits a DDP model's graph where its gradient buckets end; the layer cut there reads its input
from the previous sub-graph, as a graph input of its own. That input is an activation, not something
the caller holds: it is compressed like every other, so the DDP run compresses the same layers as one
process does, and its losses (averaged over the processes) equal one process's on both batches."""
import importlib.util
import json
import os
import subprocess
import sys

import torch

import memcompile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = {"compiler": "aot_eager", "activation": "compact", "targets": ["*"], "compact": {"rank": 8, "refresh": 1}}
ARGS = ["--hidden", "128", "--layers", "3", "--seq", "16", "--batch", "2", "--steps", "3", "--lr", "0.05",
        "--optimizer", "sgd", "--bucket-mb", "1", "--options", json.dumps(OPTIONS)]


def _example():
    spec = importlib.util.spec_from_file_location("example_ddp", os.path.join(ROOT, "examples", "ddp_finetune.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_process(ex, world):
    """The same steps in one process, on every process's batch at once."""
    args = ex.parse_args(ARGS)
    model = ex.small_llama(args.hidden, args.layers, args.seq, seed=args.seed)
    step_fn = torch.compile(model, backend="memtrain", options=ex.options(args))
    opt = ex.make_optimizer(args, model)
    streams = [ex.batches(args, rank) for rank in range(world)]
    losses = []
    for _ in range(args.steps):
        ids = torch.cat([next(s) for s in streams])
        loss = step_fn(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, ex.compressed([g for g in memcompile.reports() if not g.inference])


def test_ddp_compresses_the_layer_at_the_split(tmp_path):
    out = tmp_path / "ddp.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "examples", "ddp_finetune.py"), *ARGS, "--out", str(out)]
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    ddp = json.loads(out.read_text())

    assert len(ddp["graphs"]) >= 2, "DDP did not split the graph: make the buckets smaller than the model"
    reasons = [r for g in ddp["graphs"] for r in g["skipped"].values()]
    assert not any("graph input" in r for r in reasons), reasons
    # A layer whose input crosses the split: its group is compressed in a later sub-graph.
    assert any(g["compressed"] for g in ddp["graphs"][1:])

    losses, single = _one_process(_example(), ddp["world"])
    assert sorted(n for g in ddp["graphs"] for n in g["compressed"]) == sorted(single[0]["compressed"])
    torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-5)
    assert losses[-1] < losses[0]
