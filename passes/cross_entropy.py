"""Dynamo-graph pass: compute ``F.cross_entropy`` with ``memtrain::cross_entropy``, on the logits in
their own dtype.

Hugging Face's causal-LM loss is ``F.cross_entropy(logits.float().view(-1, V), labels)``: an fp32 copy
of the logits, then ``log_softmax``'s fp32 output saved for the backward. The pass follows the loss
input back through ``view``/``reshape`` to an upcast (``.float()``, ``.to(torch.float32)``) of a
16-bit tensor, applies the same views to that tensor and calls the kernel on it, which computes in
fp32 row by row and saves one log-sum-exp per row (``memcompile.kernels.cross_entropy``). The upcast
is dropped when nothing else reads it. An fp32 loss input is passed as it is: the saving is then
``log_softmax``'s output.

It runs on Dynamo's graph (torch functions, before AOTAutograd decomposes the loss into many aten ops)
and changes no numbers beyond fp32 round-off. Calls it cannot take (class weights, label smoothing,
``reduction="none"``, inputs that are not (N, V) logits and (N,) targets) are left alone and reported.

Example::

    counts = fuse_cross_entropy(dynamo_gm)   # {"counters": {"rewritten": 1, "skipped": 0}, ...}
"""
from __future__ import annotations

import inspect

import torch
import torch.fx as fx
import torch.nn.functional as F

from memcompile._torch_compat import FakeTensor
from memcompile.kernels import cross_entropy as kernel

NAME = "cross_entropy"
_SIGNATURE = inspect.signature(F.cross_entropy)
_VIEWS = ("view", "reshape")
_LOW = (torch.bfloat16, torch.float16)


def _val(node) -> object:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def _is_upcast(node: fx.Node) -> bool:
    if node.op != "call_method":
        return False
    if node.target == "float" and len(node.args) == 1 and not node.kwargs:
        return True
    if node.target == "to" and not node.kwargs and len(node.args) == 2:
        return node.args[1] is torch.float32
    return False


def upcast_source(loss_input: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """``(x16, views)`` when ``loss_input`` is ``views(x16.float())`` for a 16-bit ``x16``, else ``None``."""
    views, node = [], loss_input
    while node.op == "call_method" and node.target in _VIEWS and isinstance(node.args[0], fx.Node):
        views.append(node)
        node = node.args[0]
    if not _is_upcast(node) or not isinstance(node.args[0], fx.Node):
        return None
    base = node.args[0]
    val = _val(base)
    if not isinstance(val, torch.Tensor) or val.dtype not in _LOW:
        return None
    return base, views[::-1]


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
    vals = [_val(a) if isinstance(a, fx.Node) else a for a in args]
    fakes = [v for v in vals if isinstance(v, FakeTensor)]
    if not fakes:
        return None
    with fakes[0].fake_mode:
        return fn(*vals, **kwargs)


def fuse_cross_entropy(gm: fx.GraphModule) -> dict:
    """Rewrite every supported ``F.cross_entropy`` call in place; returns counters and what was done."""
    graph = gm.graph
    losses, skipped = [], []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not F.cross_entropy:
            continue
        bound = _SIGNATURE.bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        args = dict(bound.arguments)
        reason = _unsupported(args, _val(args["input"]), _val(args["target"]))
        if reason is not None:
            skipped.append({"layer": node.name, "reason": f"not fused: {reason}"})
            continue
        source = upcast_source(args["input"])
        with graph.inserting_before(node):
            x = args["input"]
            if source is not None:
                x, views = source
                for v in views:  # the same views, on the 16-bit tensor
                    new_view = graph.call_method(v.target, (x, *v.args[1:]), dict(v.kwargs))
                    new_view.meta["example_value"] = _fake_call(lambda t, *a: getattr(t, v.target)(*a), x,
                                                                *v.args[1:])
                    x = new_view
            kwargs = {"ignore_index": args["ignore_index"], "reduction": args["reduction"]}
            fused = graph.call_function(kernel.cross_entropy, (x, args["target"]), kwargs)
            fused.meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
            fused.meta["example_value"] = _fake_call(kernel.cross_entropy, x, args["target"], **kwargs)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        dropped = _erase_unused_chain(args["input"])
        xval = _val(x)
        losses.append({"loss": fused.name, "logits": tuple(xval.shape) if xval is not None else None,
                       "dtype": str(xval.dtype).removeprefix("torch.") if xval is not None else None,
                       "upcast_dropped": dropped})
    if losses:
        graph.lint()
        gm.recompile()
    return {"counters": {"rewritten": len(losses), "skipped": len(skipped)}, "losses": losses, "skipped": skipped}


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
