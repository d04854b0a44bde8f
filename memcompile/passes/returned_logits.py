"""Dynamo-graph pass: return the logits without a gradient the backward must fill with zeros.

A causal LM returns its logits beside the loss, and a training step backpropagates the loss alone.
AOTAutograd's compiled function then receives no gradient for the logits, and autograd fills one
with zeros of their size (0.49 GiB at 8192 tokens and a 32k vocabulary, bf16; 2.3 GiB at 152k) for
the backward graph, which adds it to the loss's gradient of the logits: a full-size tensor at the
start of the backward, where the saved activations peak, that changes nothing.

When a returned tensor is ``F.linear(h, W[, b])`` with ``W`` (and ``b``) graph inputs and more bytes
than ``h`` (an output projection; under autocast run in its dtype, as Hugging Face's Trainer with
``bf16=True`` runs fp32 weights), or such a projection through elementwise ops with constants
(Gemma's soft-capping ``tanh(y / c) * c``, Cohere's and Granite's scaling), the graph returns it
detached, so nothing is filled, and returns ``h`` too (the smaller tensor autograd fills instead). The
result's ``wrap`` then gives the returned logits the projection's gradient outside the compiled graph
(through the elementwise ops it reruns them from ``h``): a loss the user adds on the logits reaches
``h``, ``W`` and ``b`` as it would have. The loss's own gradients do not change, bit for bit; a gradient
through the returned logits is the same sum in another order (fp round-off). The returned logits are
a view made by an autograd Function, which autograd does not let anything change in place.

The pass runs before the fused cross-entropy rewrite, which then reads the logits' projection as before.

The report also counts the other returned tensors that require grad (a graph that serves decoder
blocks aside, whose outputs the next block reads): a backward that does not read one gets zeros of
its size too. They stay differentiable, since a loss may read them (hidden states a distillation loss
matches); after the first backward that leaves 1 MiB or more of them without a gradient, the next call
warns with the bytes of zeros. A Hugging Face model returns its KV cache that way unless
``config.use_cache=False``.

Example::

    result = ReturnedLogits(config)(dynamo_gm, ctx)   # result["counters"]["rewritten"] == 1
    compiled = result.wrap(compiled)                  # what the compile of dynamo_gm returned
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from memcompile._torch_compat import LINEAR_FUNCTIONS
from memcompile._warn import warn
from memcompile.reporting import fmt_bytes

from ._graph import example_value, hinted_bytes, hinted_shape, linear_args
from .base import GraphPass, PassContext, PassResult

NAME = "returned_logits"


# Elementwise ops a returned projection may pass through, with constants for their other arguments.
_ELEMENTWISE_FUNCTIONS = frozenset({operator.mul, operator.truediv, operator.add, operator.sub, operator.neg,
                                    torch.mul, torch.div, torch.add, torch.sub, torch.tanh})
_ELEMENTWISE_METHODS = frozenset({"mul", "div", "add", "sub", "tanh", "float", "to"})
_PREV = "<the previous tensor>"  # where a chain step reads the tensor before it


@dataclass(frozen=True)
class _Step:
    """One elementwise op after the projection: ``target(*args, **kwargs)`` with ``_PREV`` for its tensor."""

    method: bool
    target: object
    args: tuple
    kwargs: tuple

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        args = [x if a is _PREV else a for a in self.args]
        if self.method:
            return getattr(args[0], self.target)(*args[1:], **dict(self.kwargs))
        return self.target(*args, **dict(self.kwargs))


@dataclass(frozen=True)
class _Plan:
    output: int  # position of the logits among the graph's outputs
    anchor: int  # position of the projection's input among them (added at the end where it was not one)
    weight: int  # position of the weight among the graph's inputs
    bias: int | None  # and of the bias
    chain: tuple[_Step, ...] = ()  # the elementwise ops from the projection to the returned tensor
    cast: torch.dtype | None = None  # autocast's: the projection ran in it, on its inputs cast to it


@dataclass
class ReturnedLogitsResult(PassResult):
    plans: list[_Plan] = field(default_factory=list)
    outputs: int = 0  # the graph's outputs before the pass added any
    watch: bool = False  # other returned tensors require grad: warn when a backward leaves them without one
    warned: bool = False
    zeros: tuple[int, int] | None = None  # (bytes, tensors) a backward filled, warned at the next call

    def describe(self, record: dict) -> str:
        return (f"logits {record['shape']} {record['dtype']} returned detached: the backward fills no "
                f"{fmt_bytes(record['gradient_bytes'])} of zeros for them, {fmt_bytes(record['anchor_bytes'])} for "
                "the projection's input instead (which carries any gradient a loss puts on them)")

    def render(self) -> list[str]:
        lines = super().render()
        if self.counters.get("other_outputs"):
            lines.append(f"    {self.counters['other_outputs']} more returned tensors require grad "
                         f"({fmt_bytes(self.counters['other_bytes'])}): a backward that does not read them gets zeros "
                         "of their size (a Hugging Face model returns its KV cache unless config.use_cache=False)")
        return lines

    def wrap(self, compiled: Callable) -> Callable:
        """``compiled`` (the rewritten graph's compile) returning the graph's own outputs, the logits
        differentiable again through ``_ProjectionGrad``."""
        if not self.plans and not self.watch:
            return compiled
        plans, outputs = tuple(self.plans), self.outputs

        def run(*args):
            if self.zeros is not None and not self.warned:
                self._warn_zeros(*self.zeros)
            raw = compiled(*args)
            out = list(raw)
            for p in plans:
                bias = args[p.bias] if p.bias is not None else None
                out[p.output] = _ProjectionGrad.apply(out[p.output], out[p.anchor], args[p.weight], bias, p.chain,
                                                      p.cast)
            del out[outputs:]
            if self.watch and not self.warned and torch.is_grad_enabled():
                _watch_missing_grads(out, args, self._found_zeros)
            return tuple(out) if isinstance(raw, tuple) else out

        return run

    def _found_zeros(self, nbytes: int, count: int) -> None:
        # Kept for the next call, which runs on the user's thread (a GPU's backward runs on autograd's own).
        if nbytes >= WARN_ZEROS_BYTES:
            self.zeros = (nbytes, count)

    def _warn_zeros(self, nbytes: int, count: int) -> None:
        self.warned = True
        warn(f"memtrain: the backward got no gradient for {count} tensors the compiled model returned, so autograd "
             f"filled {fmt_bytes(nbytes)} of zeros for them, at the start of the backward, where memory peaks. A "
             "Hugging Face model returns its KV cache so in training: if these are its keys and values, set "
             "model.config.use_cache = False (memcompile.compile_blocks does)")


WARN_ZEROS_BYTES = 1 << 20  # zeros below this cost nothing worth a warning


def _watch_missing_grads(outs: list, args: tuple, on_missing: Callable[[int, int], None]) -> None:
    """Call ``on_missing(bytes, count)`` when a backward reaches the compiled function without a gradient
    for some of ``outs`` (before autograd fills them with zeros). A returned view counts as its base, the
    output the compiled function made; an input returned as it is (``args``) is not the function's."""
    tensors = [t for t in outs if isinstance(t, torch.Tensor) and t.requires_grad]
    inputs = {id(a) for a in args if isinstance(a, torch.Tensor)}
    nodes = {t.grad_fn for t in tensors if t._base is None and t.grad_fn is not None and id(t) not in inputs}
    sizes: dict = {}
    for t in tensors:
        src = t if t._base is None else t._base
        if src.grad_fn in nodes and src.numel() > 1:  # a one-element output is a loss
            sizes.setdefault(src.grad_fn, {})[src.output_nr] = src.numel() * src.element_size()
    for node, by_output in sizes.items():
        def prehook(grads, by_output=by_output):
            missing = [n for i, n in by_output.items() if i < len(grads) and grads[i] is None]
            if missing:
                on_missing(sum(missing), len(missing))

        node.register_prehook(prehook)


class _ProjectionGrad(torch.autograd.Function):
    """The returned logits ``y = chain(F.linear(h, W, b))`` (under autocast, of the inputs cast to ``cast``),
    computed in the graph, given their backward."""

    @staticmethod
    def forward(ctx, logits, h, w, bias, chain, cast):
        ctx.chain, ctx.cast = chain, cast
        ctx.save_for_backward(h if w.requires_grad or chain or cast else None, w, bias)
        # A view: it shares the version counter of what the graph saved from the same storage (min-cut
        # may keep the 16-bit logits), so changing it in place is refused, never silently read back.
        # Marking the input dirty instead would bump that counter and fail the graph's own backward.
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad):
        h, w, bias = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[1:4]
        if ctx.chain or ctx.cast:
            return None, *_rerun_grads(ctx.chain, ctx.cast, grad, h, w, bias, (need_h, need_w, need_b)), None, None
        grad_h = grad @ w if need_h else None
        grad_w = grad.reshape(-1, grad.shape[-1]).T @ h.reshape(-1, h.shape[-1]) if need_w else None
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if need_b else None
        return None, grad_h, grad_w, grad_b, None, None


def _rerun_grads(chain, cast, grad, h, w, bias, needs) -> list:
    """Gradients of ``h``, ``W``, ``b`` through the projection (in ``cast`` under autocast, as autocast
    casts its inputs) and its elementwise ops, rerun from ``h`` (only when a loss reads the returned logits)."""
    inputs = [None if t is None else t.detach().requires_grad_(need) for t, need in zip((h, w, bias), needs)]
    with torch.enable_grad():
        y = torch.nn.functional.linear(*(t if t is None or cast is None else t.to(cast) for t in inputs))
        for step in chain:
            y = step(y)
    wanted = [t for t, need in zip(inputs, needs) if need]
    grads = iter(torch.autograd.grad(y, wanted, grad))
    return [next(grads) if need else None for need in needs]


def _projection(y: object) -> tuple[fx.Node, list[fx.Node]] | None:
    """``(linear, chain)`` when ``y`` is an ``F.linear`` call, or one through elementwise ops whose other
    arguments are constants (``chain``: those ops, first to last); else ``None``."""
    chain = []
    while isinstance(y, fx.Node) and y.op in ("call_function", "call_method"):
        if y.op == "call_function" and y.target in LINEAR_FUNCTIONS:
            return y, chain[::-1]
        elementwise = y.target in (_ELEMENTWISE_METHODS if y.op == "call_method" else _ELEMENTWISE_FUNCTIONS)
        tensors = [a for a in (*y.args, *y.kwargs.values()) if isinstance(a, fx.Node)]
        if not elementwise or len(tensors) != 1:
            return None
        if y.op == "call_method" and y.args[0] is not tensors[0]:  # a method of a constant
            return None
        chain.append(y)
        y = tensors[0]
    return None


def _step(node: fx.Node) -> _Step:
    (prev,) = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
    args = tuple(_PREV if a is prev else a for a in node.args)
    return _Step(node.op == "call_method", node.target, args, tuple(node.kwargs.items()))


def _cast(linear: fx.Node) -> torch.dtype | None:
    """The dtype autocast ran ``linear`` in: its output's, where an input (or the weight) has another
    (fp32 weights under bf16 autocast); else ``None``."""
    out = example_value(linear).dtype
    args = [example_value(a) for a in linear_args(linear) if isinstance(a, fx.Node)]
    return out if any(a.dtype != out for a in args) else None


def _unsupported(h, w, bias, linear, y, inputs: dict) -> str | None:
    if w not in inputs or (bias is not None and bias not in inputs):
        return "weight or bias is not a graph input"
    vals = [example_value(n) for n in (h, w, linear)] + ([example_value(bias)] if bias is not None else [])
    if not all(isinstance(v, torch.Tensor) for v in vals) or not isinstance(example_value(y), torch.Tensor):
        return "no example values"
    if _cast(linear) not in (None, torch.float16, torch.bfloat16):
        return f"the projection's output is {vals[2].dtype}, its inputs {', '.join(str(v.dtype) for v in vals)}"
    y_bytes, h_bytes = hinted_bytes(example_value(y)), hinted_bytes(vals[0])
    if y_bytes is None or h_bytes is None or y_bytes <= h_bytes:
        return "not larger than the projection's input"
    return None


def returned_logits(gm: fx.GraphModule, ctx: PassContext | None = None) -> ReturnedLogitsResult:
    """Rewrite ``gm``'s returned output projections in place (see the module docstring)."""
    graph = gm.graph
    inputs = {n: i for i, n in enumerate(n for n in graph.nodes if n.op == "placeholder")}
    output = next(n for n in graph.nodes if n.op == "output")
    outs = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else None
    result = ReturnedLogitsResult(NAME)
    if outs is None:
        return result
    result.outputs = len(outs)
    for i, y in enumerate(list(outs)):
        found = _projection(y)
        if found is None:
            continue
        linear, chain = found
        val = example_value(y)
        if not isinstance(val, torch.Tensor) or not val.requires_grad or outs.count(y) != 1:
            continue
        h, w, bias = linear_args(linear)
        reason = _unsupported(h, w, bias, linear, y, inputs) if isinstance(h, fx.Node) else "input is not a tensor"
        if reason is not None:
            result.skipped.append({"layer": y.name, "reason": reason})
            continue
        with graph.inserting_before(output):
            detached = graph.call_method("detach", (y,))
        detached.meta["example_value"] = val.detach()
        outs[i] = detached
        if h not in outs:
            outs.append(h)
        result.plans.append(_Plan(i, outs.index(h), inputs[w], inputs[bias] if bias is not None else None,
                                  tuple(_step(n) for n in chain), _cast(linear)))
        result.rewritten.append({"output": y.name, "shape": hinted_shape(val),
                                 "dtype": str(val.dtype).removeprefix("torch."),
                                 "gradient_bytes": hinted_bytes(val), "anchor_bytes": hinted_bytes(example_value(h))})
    others = [] if ctx is not None and ctx.in_block else _other_outputs(outs[:result.outputs])
    if result.plans:
        output.args = (type(output.args[0])(outs),)
        gm.recompile()
    result.watch = bool(others)
    result.counters = {"rewritten": len(result.plans), "skipped": len(result.skipped), "other_outputs": len(others),
                       "other_bytes": sum(others)}
    return result


def _other_outputs(outs: list) -> list[int]:
    """Bytes of each returned tensor left differentiable, the loss (one element) aside."""
    found = []
    for node in dict.fromkeys(n for n in outs if isinstance(n, fx.Node)):
        val = example_value(node)
        if isinstance(val, torch.Tensor) and val.requires_grad:
            size = hinted_bytes(val)
            if size is not None and size > val.element_size():
                found.append(size)
    return found


class ReturnedLogits(GraphPass):
    name, stage = NAME, "pre_aot"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> ReturnedLogitsResult:
        return returned_logits(gm, ctx)
