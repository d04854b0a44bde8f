"""Dynamo-graph pass: compute ``F.cross_entropy`` with ``memtrain::cross_entropy_forward``, on the logits in
their own dtype.

Hugging Face's causal-LM loss is ``F.cross_entropy(logits.float().view(-1, V), labels)``: an fp32 copy
of the logits, then ``log_softmax``'s fp32 output saved for the backward. The pass follows the loss
input back through ``view``/``reshape`` to an upcast (``.float()``, ``.to(torch.float32)``) of a
16-bit tensor, applies the same views to that tensor and calls the kernel on it, which computes in
fp32 row by row and saves one log-sum-exp per row (``memcompile.kernels.cross_entropy``). The upcast
is dropped when nothing else reads it. An fp32 loss input is passed as it is: the saving is then
``log_softmax``'s output.

When the 16-bit logits come straight from a bias-free ``F.linear`` (the output projection) and
nothing reads them before the loss, the projection joins the loss
(``memcompile.kernels.linear_cross_entropy``): the backward then recomputes the logits chunk by chunk
and never holds their full gradient, nor keeps the logits themselves; the model still returns them.

It runs on Dynamo's graph (torch functions, before AOTAutograd decomposes the loss into many aten ops)
and changes no numbers beyond fp32 round-off. Calls it cannot take (class weights, label smoothing,
``reduction="none"``, inputs that are not (N, V) logits and (N,) targets) are left alone and reported.

Example::

    result = fuse_cross_entropy(dynamo_gm)   # result["counters"] == {"rewritten": 1, "skipped": 0}
"""
from __future__ import annotations

import inspect
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from memcompile._torch_compat import LINEAR_FUNCTIONS, FakeTensor, must_save
from memcompile.kernels import cross_entropy as kernel
from memcompile.kernels import linear_cross_entropy as linear_kernel
from memcompile.ops import memtrain

from ._graph import example_value, hinted_shape, linear_args
from .base import GraphPass, PassResult

NAME = "cross_entropy"
_SIGNATURE = inspect.signature(F.cross_entropy)
_VIEWS = ("view", "reshape")
_LOW = (torch.bfloat16, torch.float16)


def _is_upcast(node: fx.Node) -> bool:
    if node.op != "call_method":
        return False
    if node.target == "float" and len(node.args) == 1 and not node.kwargs:
        return True
    if node.target == "to" and not node.kwargs and len(node.args) == 2:
        return node.args[1] is torch.float32
    return False


def loss_source(loss_input: fx.Node) -> tuple[fx.Node, list[fx.Node], fx.Node | None]:
    """``(x, views, upcast)`` for a loss input ``views(upcast(x))`` or ``views(x)``: the tensor before
    any ``.float()``/``.to(torch.float32)``, the views after it (outermost last) and the upcast node."""
    views, node = [], loss_input
    while node.op == "call_method" and node.target in _VIEWS and isinstance(node.args[0], fx.Node):
        views.append(node)
        node = node.args[0]
    upcast = None
    if _is_upcast(node) and isinstance(node.args[0], fx.Node):
        upcast, node = node, node.args[0]
    return node, views[::-1], upcast


def linear_source(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(h, W)`` when ``node`` is ``F.linear(h, W)`` without a bias, else ``None``."""
    if node.op != "call_function" or node.target not in LINEAR_FUNCTIONS:
        return None
    h, w, bias = linear_args(node)
    if bias is not None or not isinstance(h, fx.Node) or not isinstance(w, fx.Node):
        return None
    return h, w


def _unsupported(args: dict, x, t) -> str | None:
    if args["weight"] is not None:
        return "class weights"
    if args["size_average"] is not None or args["reduce"] is not None:
        return "deprecated size_average/reduce arguments"
    if args["label_smoothing"] != 0.0:
        return "label smoothing"
    if args["reduction"] not in kernel.REDUCTIONS:
        return f"reduction={args['reduction']!r}"
    if not isinstance(args["ignore_index"], int):
        return "ignore_index is not a constant int"
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        return "input is not (N, V) logits"
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.int64:
        return "target is not (N,) class indices"
    return None


def _fake_call(fn, *args, **kwargs):
    """``fn`` on the example values of ``args`` (under their fake mode), for the new node's metadata."""
    vals = [example_value(a) if isinstance(a, fx.Node) else a for a in args]
    fakes = [v for v in vals if isinstance(v, FakeTensor)]
    if not fakes:
        return None
    with fakes[0].fake_mode:
        return fn(*vals, **kwargs)


class FusedLosses(PassResult):
    """The pass's result: its records are the fused losses."""

    listed_as = "losses"

    def describe(self, r: dict) -> str:
        return (f"fused loss {r['loss']}: logits {r['logits']} {r['dtype']}"
                + (", their fp32 copy dropped" if r["upcast_dropped"] else "")
                + (", fused with the output projection" if r.get("linear") else ""))


class FuseCrossEntropy(GraphPass):
    """The rewrite, on Dynamo's graph, where the loss is still one ``F.cross_entropy`` call."""

    name, stage = NAME, "pre_aot"

    def enabled(self) -> bool:
        return self.config.fused_cross_entropy

    def options(self) -> tuple:
        return (self.config.fused_cross_entropy,)

    def __call__(self, gm: fx.GraphModule, ctx=None) -> FusedLosses:
        return fuse_cross_entropy(gm)


class KeepLossStatistics(GraphPass):
    """The pass's second half, on the joint graph under a recompute budget (``keep_loss_statistics``)."""

    name, stage = NAME, "joint"

    def enabled(self) -> bool:
        return self.config.fused_cross_entropy and self.config.recompute_budget is not None

    def options(self) -> tuple:
        return (self.config.fused_cross_entropy, self.config.recompute_budget is not None)

    def __call__(self, gm: fx.GraphModule, ctx=None) -> FusedLosses:
        return FusedLosses(self.name, counters={"statistics_kept": keep_loss_statistics(gm)})


def fuse_cross_entropy(gm: fx.GraphModule) -> FusedLosses:
    """Rewrite every supported ``F.cross_entropy`` call in place; returns counters and what was done."""
    graph = gm.graph
    losses, skipped = [], []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not F.cross_entropy:
            continue
        bound = _SIGNATURE.bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        args = dict(bound.arguments)
        reason = _unsupported(args, example_value(args["input"]), example_value(args["target"]))
        if reason is not None:
            skipped.append({"layer": node.name, "reason": f"not fused: {reason}"})
            continue
        base, views, upcast = loss_source(args["input"])
        kwargs = {"ignore_index": args["ignore_index"], "reduction": args["reduction"]}
        if _fuse_linear(graph, node, args, kwargs, base, views, upcast, losses):
            continue
        bval = example_value(base)
        use_base = upcast is not None and isinstance(bval, torch.Tensor) and bval.dtype in _LOW
        with graph.inserting_before(node):
            x = args["input"]
            if use_base:  # the same views, on the 16-bit tensor
                x = base
                for v in views:
                    new_view = graph.call_method(v.target, (x, *v.args[1:]), dict(v.kwargs))
                    new_view.meta["example_value"] = _fake_call(lambda t, *a: getattr(t, v.target)(*a), x,
                                                                *v.args[1:])
                    x = new_view
            fused = graph.call_function(kernel.cross_entropy, (x, args["target"]), kwargs)
            fused.meta["example_value"] = _fake_call(kernel.cross_entropy, x, args["target"], **kwargs)
        dropped = _replace_loss(node, fused, args["input"]) and use_base
        losses.append(_record(fused, example_value(x), dropped, linear=False))
    if losses:
        graph.lint()
        gm.recompile()
    return FusedLosses(NAME, losses, skipped, {"rewritten": len(losses), "skipped": len(skipped)})


def _replace_loss(node: fx.Node, new: fx.Node, loss_input: fx.Node) -> bool:
    """Put ``new`` in place of the ``F.cross_entropy`` node (its metadata but the example value, its
    readers), then erase the upcast and views that fed it; True if an upcast went."""
    new.meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)
    return _erase_unused_chain(loss_input)


def _record(loss: fx.Node, logits, upcast_dropped: bool, linear: bool) -> dict:
    """What the report shows of one fused loss."""
    # At the traced example's sizes: a symbolic size would tie the report to the compile's shape environment.
    return {"loss": loss.name, "logits": hinted_shape(logits) if logits is not None else None,
            "dtype": str(logits.dtype).removeprefix("torch.") if logits is not None else None,
            "upcast_dropped": upcast_dropped, "linear": linear}


def _fuse_linear(graph: fx.Graph, node: fx.Node, args: dict, kwargs: dict, logits: fx.Node, views: list[fx.Node],
                 upcast: fx.Node | None, losses: list) -> bool:
    """Fuse the bias-free ``F.linear`` that makes the logits into the loss (``linear_cross_entropy``).

    Only when the logits are ``(..., V)`` viewed to ``(N, V)`` for the loss, the upcast and views have no
    other reader, and every other reader of the logits (the model's output) comes after the loss, where
    the fused op's logits are defined. Returns whether it fused.
    """
    linear = linear_source(logits)
    if linear is None:
        return False
    chain = [*([upcast] if upcast is not None else []), *views]
    if any(len(n.users) != 1 for n in chain):
        return False
    into_loss = chain[0] if chain else node  # the reader of the logits on the way to the loss
    order = {n: i for i, n in enumerate(graph.nodes)}
    if any(order[u] < order[node] for u in logits.users if u is not into_loss):
        return False
    lval, hval = example_value(logits), example_value(linear[0])
    if lval is None or hval is None or lval.dim() < 2 or hval.shape[:-1] != lval.shape[:-1]:
        return False
    h, w = linear
    with graph.inserting_before(node):
        # Under autocast F.linear casts its inputs to the autocast dtype; the fused op is a custom op,
        # which autocast leaves alone: cast them as F.linear would, so the logits keep their dtype.
        h, w = (_cast(graph, t, lval.dtype) for t in (h, w))
        fused = graph.call_function(linear_kernel.linear_cross_entropy, (h, w, args["target"]), kwargs)
        fused.meta["example_value"] = _fake_call(linear_kernel.linear_cross_entropy, h, w, args["target"], **kwargs)
        loss = graph.call_function(operator.getitem, (fused, 0))
        new_logits = graph.call_function(operator.getitem, (fused, 1))
        if fused.meta["example_value"] is not None:
            loss.meta["example_value"], new_logits.meta["example_value"] = fused.meta["example_value"]
    dropped = _replace_loss(node, loss, args["input"]) and lval.dtype in _LOW
    logits.replace_all_uses_with(new_logits)  # the model's output now comes from the fused op
    graph.erase_node(logits)
    losses.append(_record(loss, lval, dropped, linear=True))
    return True


def _cast(graph: fx.Graph, node: fx.Node, dtype: torch.dtype) -> fx.Node:
    """``node.to(dtype)`` where its dtype differs (inserted at the graph's insertion point)."""
    val = example_value(node)
    if not isinstance(val, torch.Tensor) or val.dtype == dtype:
        return node
    cast = graph.call_method("to", (node, dtype))
    cast.meta["example_value"] = _fake_call(lambda t: t.to(dtype), node)
    return cast


def _erase_unused_chain(node: fx.Node) -> bool:
    """Erase ``node`` and the views/upcast feeding it while nothing reads them; True if an upcast went."""
    dropped = False
    while isinstance(node, fx.Node) and not node.users and node.op == "call_method" and \
            (node.target in _VIEWS or _is_upcast(node)):
        parent = node.args[0]
        dropped = dropped or _is_upcast(node)
        node.graph.erase_node(node)
        node = parent
    return dropped


def keep_loss_statistics(joint: fx.GraphModule) -> int:
    """On the joint graph, under a recompute budget: never recompute a fused loss, so its per-row
    log-sum-exp is saved. The partitioner prices custom ops at no cost and would otherwise rather rerun
    the whole loss (for the projection: one more logits tensor and its matmul) in the backward than keep
    4 bytes a token. Returns how many were marked."""
    ops = (memtrain.cross_entropy_forward.default, memtrain.linear_cross_entropy_forward.default)
    marked = 0
    for node in list(joint.graph.nodes):
        if node.op == "call_function" and node.target in ops:
            # Not the getitems: the partitioner never bans recomputing a getitem. The log-sum-exp reaches
            # the backward through a detach, and that tensor is kept. The fused projection is banned
            # from recomputation too (the partitioner prices it at zero and would rerun its matmul);
            # the plain loss is not: banning it when its inputs are graph inputs (a loss compiled on its
            # own, as compile_blocks does) makes the partitioner save its tuple output, which
            # AOTAutograd cannot save.
            kept = [d for g in node.users if g.target is operator.getitem
                    for d in g.users if d.target is torch.ops.aten.detach.default]
            if node.target is memtrain.linear_cross_entropy_forward.default:
                kept.append(node)
            elif not kept:
                kept = _statistics_copies(node)
            for target in kept:
                must_save(target)
            marked += 1
    return marked


def _statistics_copies(loss: fx.Node) -> list[fx.Node]:
    """For a plain fused loss whose log-sum-exp reaches the backward without a detach (Inductor's joint
    graph drops them): a copy of each output the backward reads, for the partitioner to keep. Marking
    the op itself, a tuple, let the budgeted partitioner save the tuple when it had nothing else to
    recompute (a loss compiled on its own), which Inductor cannot lower. The copy is 4 bytes a row."""
    graph, copies = loss.graph, []
    for g in [u for u in loss.users if u.target is operator.getitem]:
        readers = [u for u in g.users if u.target is memtrain.cross_entropy_backward.default]
        if not readers:
            continue
        with graph.inserting_after(g):
            copy = graph.call_function(torch.ops.aten.clone.default, (g,))
        copy.meta = {k: v for k, v in g.meta.items() if k in ("val", "tensor_meta", "stack_trace")}
        for reader in readers:
            reader.replace_input_with(g, copy)
        copies.append(copy)
    return copies
