"""Joint-graph pass: rebuild broadcast copies in the backward instead of saving them.

Grouped-query attention repeats each key/value head for the query heads that share it
(``repeat_kv``: ``expand`` then ``reshape``, which copies). The attention backward reads the repeated
tensors, and the min-cut partitioner, left alone, can save them: ``num_heads / num_kv_heads`` times the
bytes of the tensor they were copied from (8x on TinyLlama, 13 % of everything its whole-model graph
saves at 128 tokens). The copy is pure data movement, so rebuilding it in the backward from its
source is exact and costs one write of the copy, the same as the forward paid.

The pass finds every forward ``expand`` at least twice the size of its input that is copied, and
marks it and everything made from it by data movement alone (views, copies) as must-recompute, so the
partitioner saves the unexpanded tensor instead. Nodes already tagged (activation checkpointing, must-save
marks of other passes) are left alone.

Example::

    counters = recompute_broadcasts(joint_gm)   # before the min-cut partitioner
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from memcompile._torch_compat import must_recompute, partitioner_tag

from ._graph import VIEW_OPS, hinted_shape
from .base import GraphPass, PassResult

NAME = "broadcast_recompute"

aten = torch.ops.aten
# Ops that only move data: a tensor made from a broadcast by these holds nothing but copies of it.
_MOVES = VIEW_OPS | {aten.clone.default, aten.expand.default}


def _numel(node: fx.Node) -> int | None:
    shape = hinted_shape(node.meta.get("val"))
    return None if shape is None else math.prod(shape)


def _forward(node: fx.Node) -> bool:
    return node.op == "call_function" and partitioner_tag(node) != "is_backward"


def _moved_from(expand: fx.Node) -> list[fx.Node]:
    """``expand`` and every forward node made from it by data movement alone."""
    family, todo, seen = [], [expand], {expand}
    while todo:
        n = todo.pop()
        family.append(n)
        for u in n.users:
            if u not in seen and _forward(u) and u.target in _MOVES and u.args[0] is n:
                seen.add(u)
                todo.append(u)
    return family


def recompute_broadcasts(gm: fx.GraphModule) -> dict:
    """Mark the copies of broadcast tensors (and every view of them) must-recompute; returns counts and
    the bytes of the copies."""
    marked, copies, nbytes = 0, 0, 0
    for node in list(gm.graph.nodes):
        if not (_forward(node) and node.target is aten.expand.default and isinstance(node.args[0], fx.Node)):
            continue
        out, base = _numel(node), _numel(node.args[0])
        if out is None or base is None or out < 2 * base or "recompute" in node.meta:
            continue
        family = [n for n in _moved_from(node) if "recompute" not in n.meta]
        clones = [n for n in family if n.target is aten.clone.default]
        if not clones:
            continue  # a broadcast that is never copied costs nothing to save
        for n in family:
            must_recompute(n)
        marked += len(family)
        copies += len(clones)
        nbytes += sum(_numel(c) * c.meta["val"].element_size() for c in clones)
    return {"copies": copies, "marked": marked, "bytes": nbytes}


class RecomputeBroadcasts(GraphPass):
    """The pass, on the joint graph; with the min-cut partitioner (the default one saves what the
    forward made and recomputes nothing)."""

    name, stage = NAME, "joint"

    def enabled(self) -> bool:
        return self.config.partitioner == "mincut"

    def options(self) -> tuple:
        return (self.config.partitioner == "mincut",)

    def __call__(self, gm: fx.GraphModule, ctx=None) -> PassResult:
        return PassResult(self.name, counters=recompute_broadcasts(gm))
