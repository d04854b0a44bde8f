"""Joint-graph pass: keep recomputation inside a block by saving what enters each repeated block.

Under a recompute budget the min-cut partitioner may drop any saved tensor it can rebuild. Left
alone, it also drops the residual stream between decoder layers, so the backward of layer ``i``
rebuilds layer ``i``'s input through layers ``0..i-1``, and those rebuilt values stay live until each
layer's backward reads them: many layers of recomputed activations at once, a higher peak than saving
everything. Marking every tensor that enters a block from outside as must-save (the activation
checkpointing boundary) keeps each recomputation to one block, as gradient checkpointing does, while the
budget still chooses what inside the block to save.

A block is a child of an ``nn.ModuleList`` (``model.layers.3``, ``transformer.h.0``): the joint graph's
nodes carry the module stack they were traced in (``meta["nn_module_stack"]``), and a path ending in an
integer is a list child.

Example::

    n = mark_block_inputs(joint_gm)   # before the min-cut partitioner, under a memory budget
"""
from __future__ import annotations

import torch
import torch.fx as fx

from memcompile._torch_compat import must_save, partitioner_tag

from .base import GraphPass, PassResult

NAME = "block_boundaries"


def block_of(node: fx.Node) -> str | None:
    """Path of the innermost ModuleList child ``node`` was traced in (``None``: outside every block)."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _cls in reversed(list(stack.values())):
        if path.rsplit(".", 1)[-1].isdigit():
            return path
    return None


def mark_block_inputs(gm: fx.GraphModule) -> dict:
    """Mark forward tensors read inside a block they were not made in as must-save; returns counts."""
    marked, blocks = 0, set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or partitioner_tag(node) == "is_backward":
            continue
        if not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        home = block_of(node)
        readers = {block_of(u) for u in node.users if partitioner_tag(u) != "is_backward"}
        entered = {b for b in readers if b is not None and b != home}
        if entered:
            must_save(node)
            marked += 1
            blocks |= entered
    return {"marked": marked, "blocks": len(blocks)}


class MarkBlockInputs(GraphPass):
    """The pass, on the joint graph; only under a recompute budget, the only case where min-cut
    recomputes across blocks."""

    name, stage = NAME, "joint"

    def enabled(self) -> bool:
        return self.config.recompute_budget is not None

    def options(self) -> tuple:
        return (self.config.recompute_budget is not None,)

    def __call__(self, gm: fx.GraphModule, ctx=None) -> PassResult:
        return PassResult(self.name, counters=mark_block_inputs(gm))
