"""The block-boundary pass on its own: under a recompute budget, what enters each block is saved, so
the backward never rebuilds one block's input through the blocks before it."""
import torch
import torch.fx as fx

from memcompile._torch_compat import (
    activation_memory_budget,
    aot_autograd,
    make_boxed_func,
    min_cut_rematerialization_partition,
)
from memcompile.passes.block_boundaries import block_of, mark_block_inputs


class Block(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.up = torch.nn.Linear(width, 4 * width)
        self.down = torch.nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)).square())


class Stack(torch.nn.Module):
    def __init__(self, n=4, width=16):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(width) for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _saved_block_inputs(mark: bool, budget: float = 0.01):
    """Names of the forward nodes that enter a block (the joint graph's), and of the tensors saved."""
    seen = {}

    def partition(joint, inputs, **kw):
        nodes = [n for n in joint.graph.nodes if n.op == "call_function"]
        seen["entering"] = {n.name for n in nodes if block_of(n) is not None
                            and any(block_of(u) not in (None, block_of(n)) for u in n.users)}
        seen["blocks"] = {block_of(n) for n in nodes} - {None}
        if mark:
            seen["counts"] = mark_block_inputs(joint)
        with activation_memory_budget(budget):
            fw, bw = min_cut_rematerialization_partition(joint, inputs, **kw)
        out = next(n for n in fw.graph.nodes if n.op == "output")
        seen["saved"] = {a.name for a in fx.node.map_arg(out.args[0], lambda a: a)[kw["num_fwd_outputs"]:]
                         if isinstance(a, fx.Node)}
        return fw, bw

    torch.manual_seed(0)
    model, x = Stack(), torch.randn(8, 16, requires_grad=True)
    boxed = lambda gm, ex: make_boxed_func(gm.forward)  # noqa: E731
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=boxed, bw_compiler=boxed,
                                                          partition_fn=partition))
    out = compiled(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    for g, p in zip(grads, model.parameters()):  # marking changes what is saved, never the numbers
        torch.testing.assert_close(g, p.grad)
    return seen


def test_blocks_are_modulelist_children():
    seen = _saved_block_inputs(mark=False, budget=1.0)
    assert seen["blocks"] == {f"L['self'].blocks.{i}" for i in range(4)}


def test_block_inputs_are_saved_only_with_the_pass():
    without = _saved_block_inputs(mark=False)
    with_pass = _saved_block_inputs(mark=True)
    entering = with_pass["entering"]
    assert len(entering) == 3  # the residual stream into blocks 1, 2, 3 (block 0 reads the graph input)
    assert with_pass["counts"] == {"marked": 3, "blocks": 3}
    assert entering <= with_pass["saved"]
    # A tiny budget: without the marks the partitioner recomputes the residual stream from the input.
    assert not entering <= without["saved"]
