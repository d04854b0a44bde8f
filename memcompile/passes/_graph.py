"""Small graph utilities shared by the passes: inlining traced code, view chains, linear calls, dumps."""
from __future__ import annotations

import math
import os
from typing import Callable, Iterable, Sequence

import torch
import torch.fx as fx

from memcompile._torch_compat import fake_mode_of, make_fx, size_hint

aten = torch.ops.aten

# Ops that only re-view their input: a tensor and all its views share one storage, so what a
# partitioner saves is the storage of the family, whichever member it picks.
VIEW_OPS = frozenset({
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.t.default,
    aten.permute.default, aten.transpose.int, aten.expand.default, aten.alias.default,
    aten.squeeze.dim, aten.unsqueeze.default, aten.detach.default,
})
TRANSPOSE_OPS = frozenset({aten.t.default, aten.permute.default, aten.transpose.int})


def hinted_shape(val) -> tuple[int, ...] | None:
    """A tensor's sizes at the example Dynamo traced with, without guarding on them (``int()`` of a
    symbolic size would specialise the graph to this length and make every other length recompile);
    ``None`` for a non-tensor or an unbacked size."""
    if not isinstance(val, torch.Tensor):
        return None
    sizes = tuple(size_hint(s) for s in val.shape)
    return None if None in sizes else sizes


def hinted_bytes(val) -> int | None:
    """A tensor's bytes at the example Dynamo traced with (``hinted_shape``); ``None`` where that is unknown."""
    shape = hinted_shape(val)
    return None if shape is None else math.prod(shape) * val.element_size()


def example_value(node: object) -> object:
    """The value a graph node had when traced: Dynamo's ``example_value``, else the ``val`` AOTAutograd
    and make_fx record; ``None`` for a non-node."""
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def memory_order(val) -> tuple[int, ...] | None:
    """The dims of a dense tensor from its largest stride to its smallest: ``val.permute(order)`` is a
    contiguous view of the same memory (the identity for a contiguous tensor, ``(0, 2, 1, 3)`` for a
    transposed one). ``None`` where its elements do not fill one block of memory once each (an expanded,
    overlapping or strided view) or a size has no hint."""
    shape = hinted_shape(val)
    strides = None if shape is None else tuple(size_hint(s) for s in val.stride())
    if strides is None or None in strides:
        return None
    dims = tuple(range(len(shape)))
    order = dims if _dense_in(shape, strides, dims) else tuple(sorted(dims, key=lambda d: -strides[d]))
    return order if _dense_in(shape, strides, order) else None


def _dense_in(shape, strides, order) -> bool:
    expected = 1
    for d in reversed(order):
        if shape[d] != 1:  # a dim of one element may have any stride
            if strides[d] != expected:
                return False
            expected *= shape[d]
    return True


def is_call(node: object, targets: Iterable) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def linear_args(node: fx.Node) -> tuple:
    """``(input, weight, bias)`` of a functional linear call (``_torch_compat.LINEAR_FUNCTIONS``), by
    position or keyword; ``bias`` is ``None`` when the call has none."""
    args = list(node.args) + [None] * (3 - len(node.args))
    return tuple(node.kwargs.get(k, a) for k, a in zip(("input", "weight", "bias"), args))


def view_base(node: fx.Node) -> fx.Node:
    """The first ancestor of ``node`` that is not a view of its input."""
    while is_call(node, VIEW_OPS) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def view_family(base: fx.Node) -> list[fx.Node]:
    """``base`` and every node that is a (transitive) view of it."""
    family, todo = [], [base]
    while todo:
        n = todo.pop()
        family.append(n)
        todo.extend(u for u in n.users if is_call(u, VIEW_OPS) and u.args[0] is n)
    return family


def insert_traced(graph: fx.Graph, fn: Callable, inputs: Sequence[fx.Node], *, before: fx.Node,
                  tag: str | None, decompositions: dict | None = None, name: str = "memtrain"):
    """Trace ``fn`` on the fake values of ``inputs`` with make_fx and inline the result before ``before``.

    Tracing (rather than building nodes by hand) gives every new node a FakeTensor ``meta["val"]``
    and, with Inductor's decomposition table, the IR Inductor expects after its own decompositions.
    Returns the output node(s) in ``fn``'s output structure.
    """
    fake_mode = fake_mode_of(graph)
    with fake_mode:
        sub = make_fx(fn, decomposition_table=decompositions or {})(*[n.meta["val"] for n in inputs])
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    env: dict[fx.Node, fx.Node] = dict(zip(placeholders, inputs))
    # inserting_before keeps program order; a run of inserting_after(n) would reverse it.
    with graph.inserting_before(before):
        for n in sub.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                return fx.node.map_arg(n.args[0], lambda a: env[a])
            if n.op == "get_attr":
                raise RuntimeError(f"{name}: traced code created a constant ({n.target}); pass it as an input")
            new = graph.node_copy(n, lambda a: env[a])
            new.meta.pop("partitioner_tag", None)
            if tag is not None:
                new.meta["partitioner_tag"] = tag
            new.meta["memtrain_pass"] = name
            env[n] = new
    raise AssertionError("traced graph has no output")


def first_non_placeholder(graph: fx.Graph) -> fx.Node:
    return next(n for n in graph.nodes if n.op != "placeholder")


def dump_graph(dump_dir: str | None, name: str, gm_or_graph) -> None:
    """Write a readable graph to ``dump_dir/name.txt`` (no-op without a directory)."""
    if not dump_dir:
        return
    os.makedirs(dump_dir, exist_ok=True)
    if isinstance(gm_or_graph, fx.GraphModule):
        text = gm_or_graph.print_readable(print_output=False, include_stride=True, include_device=True)
    else:
        text = str(gm_or_graph)
    with open(os.path.join(dump_dir, f"{name}.txt"), "w") as f:
        f.write(text)
