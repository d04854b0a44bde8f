"""Partitioned-graph pass: meet ``memory_target`` by choosing, for every saved tensor, keep, recompute,
offload or fp8, at the least estimated time.

It runs after the partitioner, on the forward and backward graphs, where what is saved is explicit:
the forward's outputs after its user outputs, read by the backward's placeholders of the same names.
Rewriting there changes exactly the tensor it targets (on the joint graph, min-cut would answer a
removed tensor by saving another made from it). Each saved activation gets its ways to leave the
device, each priced by a cost model (``PlanConfig``: FLOPs and bytes at the device's rates, a fixed
cost per inserted op):

* **recompute**: the ops that made it rerun in the backward, from tensors that are saved anyway (and
  parameters, alive the whole step): nothing new is saved, so the bytes freed are exactly the tensor's, and the result is
  exact. A region of a model (``compile_blocks``) may also rebuild from an activation it is passed
  (the head: log_softmax's fp32 output from the final hidden states), which it then keeps: that way
  frees the difference, and the input kept becomes a saved tensor with ways of its own (a host copy,
  fp8), taken in their turn. Never through a random op (dropout's mask is read saved, never redrawn; attention only without
  dropout) or more than ``RECOMPUTE_LIMIT`` ops; through attention, priced at its matmuls' FLOPs. The
  tensors it reads may still be offloaded or recomputed in their turn, but not rounded to fp8.
* **offload**: ``memtrain::offload`` starts a copy to pinned host memory right after it is made, and
  ``memtrain::reload`` one back in the backward; each copy's wait comes after (before) the ops the cost
  model expects to take as long as the copy, so the copies run beside compute
  (``memcompile/kernels/host_offload.py``). Exact. Priced at both copies over the host link in full:
  the link's time is what the step may lose where compute does not cover it.
* **fp8**: ``memtrain::fp8_quantize`` stores it as e4m3 with a scale per row, ``fp8_dequantize``
  restores it for the backward. Lossy (relative error at most 2^-4 per element), so only with
  ``plan.fp8``; only for the output of a single-output op with rows of at least 16 elements, so
  attention's and normalisation's statistics (which feed exponentials) are never rounded.

Every tensor's ways go into one list, sorted by price (time per byte freed); each tensor takes its first
way that does not conflict with an earlier choice (a recompute never reads an fp8 tensor; it may read
one that another choice recomputes or copies, and then reads it rebuilt). An input's ways count only
once a recompute keeps it: then at once, if their place in the list has passed. The plan for a target is the shortest prefix of that sequence that brings the saved
bytes under it. The sequence does not depend on the target, so a smaller target takes a longer prefix
and never keeps more: monotonic by construction, and each choice frees exactly its bytes. A target
below what the whole sequence reaches is refused with that minimum.

Example::

    result = PlanMemory(config)(Partitioned(fw, bw, num_fwd_outputs), ctx)
    print("\\n".join(result.render()))
"""
from __future__ import annotations

import dataclasses
import functools
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from memcompile._torch_compat import partitioner_tag, size_bound, size_hint
from memcompile._warn import warn
from memcompile.config import PlanConfig
from memcompile.ops import memtrain
from memcompile.quant.nf4.nf4_linear import NF4LinearArgs
from memcompile.reporting import fmt_bytes, reports, saved_tensors

from ._graph import VIEW_OPS, first_non_placeholder, hinted_bytes, hinted_shape, insert_traced, memory_order, view_base
from .base import GraphPass, PassResult

NAME = "memory_plan"
aten = torch.ops.aten
_MATMULS = {aten.mm.default: "mm", aten.addmm.default: "addmm", aten.bmm.default: "bmm"}
# Fused attention ops (multi-output: output, log-sum-exp, ...) -> the positions of dropout_p and is_causal.
_ATTENTION = {aten._scaled_dot_product_flash_attention.default: (3, 4),
              aten._scaled_dot_product_flash_attention_for_cpu.default: (3, 4),
              aten._scaled_dot_product_efficient_attention.default: (5, 6),
              aten._scaled_dot_product_cudnn_attention.default: (5, 6)}
# Reductions Inductor generates itself (a normalisation's mean, softmax's max and sum): pointwise
# producers fuse into them.
_REDUCTIONS = frozenset({aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.var_mean.correction,
                         torch.ops.prims.sum.default, torch.ops.prims.var.default})
_FP8_MIN_ROW = 16  # a row's fp32 scale costs 4 bytes: at 16 elements that is already a fifth of the row
_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
# Ops a recompute may rerun, random ones aside: Inductor's decompositions turn dtype casts into prims.
_PURE_NAMESPACES = ("aten", "prims", "memtrain")
RECOMPUTE_LIMIT = 48  # nodes rerun for one saved tensor: a decoder block's forward is about 60 aten ops


@dataclass
class Choice:
    """One way to free one saved tensor."""

    node: fx.Node
    action: str  # "recompute" | "offload" | "fp8"
    bytes: int  # on the device before
    bytes_after: int  # on the device after
    seconds: float  # estimated cost added to the step
    closure: tuple[fx.Node, ...] = ()  # recompute: the nodes rerun in the backward, ``node`` last
    frontier: frozenset = frozenset()  # recompute: the saved tensors they read
    # recompute: the activation inputs it keeps, with their bytes (``bytes_after`` counts those that no
    # earlier choice keeps); a host copy or fp8 of such an input: ``((node, bytes),)``, valid once kept
    keeps: tuple[tuple[fx.Node, int], ...] = ()

    @property
    def freed(self) -> int:
        return self.bytes - self.bytes_after

    @property
    def price(self) -> float:
        return self.seconds / self.freed


class MemoryPlan(PassResult):
    listed_as = "plan"

    def merged(self, other: PassResult) -> PassResult:
        # Graphs of one step each hold the same target (a region its share): the target is not a sum.
        out = super().merged(other)
        for key in ("target", "step_target"):
            if key in self.counters or key in other.counters:
                out.counters[key] = max(self.counters.get(key, 0), other.counters.get(key, 0))
        return out

    @property
    def predicted_saving(self) -> int:
        return self.counters["before"] - self.counters["after"]

    def describe(self, r: dict) -> str:
        if r["action"] == "keep":
            return f"{r['tensor']} {r['shape']} {r['dtype']} {fmt_bytes(r['bytes'])}: keep"
        return (f"{r['tensor']} {r['shape']} {r['dtype']} {fmt_bytes(r['bytes'])}: {r['action']} -> "
                f"{fmt_bytes(r['bytes_after'])}, ~{r['seconds'] * 1e6:.0f} us")

    def render(self) -> list[str]:
        c = self.counters
        bound = "" if "bound_before" not in c else (
            f" (at the largest sizes the graph accepts: {fmt_bytes(c['bound_before'])} -> {fmt_bytes(c['bound_after'])})")
        share = "" if c.get("step_target", c["target"]) == c["target"] else (
            f" a run (its share of the step's {fmt_bytes(c['step_target'])})")
        lines = [f"  pass {self.name}: target {fmt_bytes(c['target'])}{share}; saved {fmt_bytes(c['before'])} -> "
                 f"{fmt_bytes(c['after'])}{bound}; estimated cost "
                 f"{c['seconds'] * 1e3:.2f} ms a step; recompute {c['recompute']}, offload {c['offload']}, "
                 f"fp8 {c['fp8']}, kept {c['keep']}"]
        changed = [r for r in self.rewritten if r["action"] != "keep"]
        lines.extend("    " + self.describe(r) for r in changed[:40])
        if len(changed) > 40:
            lines.append(f"    ... ({len(changed)} changed in all)")
        return lines


def _arg(node: fx.Node, index: int, name: str, default):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _attention_flops(node: fx.Node) -> int:
    """An attention op's two matmuls (scores and their weighted sum), halved when causal."""
    _, causal_index = _ATTENTION[node.target]
    q, k = (hinted_shape(a.meta["val"]) for a in node.args[:2])
    if q is None or k is None:
        return 0
    flops = 4 * math.prod(q) * k[-2]
    return flops // 2 if _arg(node, causal_index, "is_causal", False) else flops


def _flops(node: fx.Node) -> int:
    """Multiply-adds times two of a matmul or attention; other ops are priced by the bytes they move."""
    if node.target in _ATTENTION:
        return _attention_flops(node)
    if node.target is memtrain.nf4_linear.default:  # x @ W^T with W dequantised first
        args = _nf4_args(node)
        x = hinted_shape(args.x.meta["val"])
        return 0 if x is None else 2 * math.prod(x) * args.shape[0]
    kind = _MATMULS.get(node.target)
    if kind is None:
        return 0
    a, b = (node.args[1], node.args[2]) if kind == "addmm" else node.args[:2]
    sa, sb = hinted_shape(a.meta["val"]), hinted_shape(b.meta["val"])
    if sa is None or sb is None:
        return 0
    return 2 * math.prod(sa) * sb[-1]


def _is_scalar(node: fx.Node) -> bool:
    """A symbolic size (a variable token count) or arithmetic on sizes: no memory, recomputed freely."""
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))


def _is_random(node: fx.Node) -> bool:
    """Whether ``node`` draws random numbers. Attention's fused ops are tagged so for their dropout: they
    draw only with a dropout probability that is not 0."""
    if node.target in _ATTENTION:
        dropout_index, _ = _ATTENTION[node.target]
        return _arg(node, dropout_index, "dropout_p", 0.0) != 0
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags


def _free(node: fx.Node) -> bool:
    """A view, or one output of a multi-output op: no kernel, no bytes moved."""
    return node.target in VIEW_OPS or node.target is operator.getitem


def _op_seconds(node: fx.Node, cfg: PlanConfig) -> float:
    """One op run as its own kernel: its FLOPs, the bytes it reads and writes, a launch."""
    return group_seconds([node], cfg)


def group_seconds(nodes, cfg: PlanConfig) -> float:
    """``nodes`` (a recompute) run as Inductor runs them: views are free, and a pointwise op whose every
    reader is a pointwise op or a reduction of the group is fused into its readers (no launch of its
    own, its result never written nor read back). A rerun SwiGLU or normalisation is then priced as
    the one or two kernels it compiles to, not as an op-by-op pass over memory."""
    group = set(nodes)
    fused = {n for n in nodes if _pointwise(n) and n.users and all(r in group and _fusible(r) for r in _readers(n))}
    seconds = 0.0
    for n in nodes:
        if n.op != "call_function" or _free(n):
            continue
        moved = sum(hinted_bytes(a.meta.get("val")) or 0 for a in n.all_input_nodes if view_base(a) not in fused)
        if n not in fused:
            moved += (hinted_bytes(n.meta.get("val")) or 0) + _scratch_bytes(n)
            seconds += cfg.op_seconds
        seconds += _flops(n) / cfg.flops_per_s + moved / cfg.memory_bytes_per_s
    return seconds


def _pointwise(node: fx.Node) -> bool:
    return node.op == "call_function" and torch.Tag.pointwise in getattr(node.target, "tags", ())


def _fusible(node: fx.Node) -> bool:
    """An op Inductor generates code for itself, so a pointwise producer fuses into it."""
    return _pointwise(node) or node.target in _REDUCTIONS


def _readers(node: fx.Node) -> list[fx.Node]:
    """The nodes that read ``node``'s values, through its views."""
    out = []
    for u in node.users:
        out.extend(_readers(u) if u.target in VIEW_OPS else [u])
    return out


def _scratch_bytes(node: fx.Node) -> int:
    """Bytes an op writes and reads back inside itself: NF4 linear's dense weight."""
    if node.target is not memtrain.nf4_linear.default:
        return 0
    args = _nf4_args(node)
    return 2 * math.prod(args.shape) * args.x.meta["val"].element_size()


def _nf4_args(node: fx.Node) -> NF4LinearArgs:
    return NF4LinearArgs(*node.args, **node.kwargs)


def recompute_closure(node: fx.Node, available: set[fx.Node], order: dict[fx.Node, int],
                      limit: int = RECOMPUTE_LIMIT, held: frozenset = frozenset(), inputs: frozenset = frozenset()):
    """The forward nodes to rerun so that ``node`` is rebuilt from ``available`` (saved) tensors alone,
    in graph order, and the saved tensors they read; ``None`` when that takes a random op (dropout's
    mask is never redrawn: it is read saved; attention with dropout is one), an op outside aten, prims
    and memtrain, compression's state ops (they must run once a step), an unsaved graph input that is
    not in ``held``, or more than ``limit`` nodes. memtrain's other ops (NF4 linear, the
    projections' sketch) are pure functions of their inputs. ``order``: each node's position in the
    graph. ``held``: parameters among the graph's inputs, alive the whole step: a recompute may read one
    the backward does not get yet, which ``apply`` then saves for it at no cost (an adapter cast to
    bf16 in the forward reads its fp32 parameter). ``inputs``: activations passed in (a region's
    incoming hidden states) that a recompute may read too, though saving one keeps it alive: its
    caller (``choices_for``) prices that in."""
    state_ops = _state_ops()
    closure, frontier, todo, seen = [], set(), [node], {node}
    while todo:
        n = todo.pop()
        if n is not node and (n in available or n in held or n in inputs):
            frontier.add(n)  # saved anyway (the backward has it), a parameter (free to save) or an input
            continue
        if n.op == "call_function" and (n.target is operator.getitem or _is_scalar(n)):
            pass  # one output of a multi-output op (the op is rerun with it), or arithmetic on sizes
        elif (n.op != "call_function" or _is_random(n)
                or getattr(n.target, "namespace", None) not in _PURE_NAMESPACES or n.target in state_ops):
            return None  # includes a graph input the backward does not get
        closure.append(n)
        if len(closure) > limit:
            return None
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return tuple(sorted(closure, key=order.__getitem__)), frozenset(frontier)


def choices_for(node: fx.Node, nbytes: int, available: set[fx.Node], cfg: PlanConfig, offload: bool,
                order: dict[fx.Node, int], held: frozenset = frozenset(),
                inputs: dict[fx.Node, int] | None = None) -> list[Choice]:
    """Every way ``node`` (a saved tensor of ``nbytes``) may leave the device, with its estimated cost.
    ``inputs``: the forward's activation inputs the backward does not get, with their bytes: a recompute
    that reads one keeps it instead (the head of ``compile_blocks`` rebuilds log_softmax's fp32 output
    from the final hidden states it is passed), which frees only the difference."""
    val = node.meta["val"]
    out: list[Choice] = []
    inputs = inputs or {}
    if cfg.recompute and node.op != "placeholder":
        found = recompute_closure(node, available, order, held=held, inputs=frozenset(inputs))
        if found is not None:
            closure, frontier = found
            keeps = tuple(sorted(((f, inputs[f]) for f in frontier if f in inputs), key=lambda k: order[k[0]]))
            kept = sum(b for _, b in keeps)
            if kept < nbytes:
                seconds = group_seconds(closure, cfg)
                out.append(Choice(node, "recompute", nbytes, kept, seconds, closure, frontier, keeps))
    order = memory_order(val)
    if order is None:  # a copy of it is made dense: its readers' strides would no longer hold
        return out
    if offload:
        out.append(Choice(node, "offload", nbytes, 0, 2 * nbytes / cfg.host_bytes_per_s + 2 * cfg.op_seconds))
    shape = hinted_shape(val)
    if (cfg.fp8 and val.dtype in _FLOAT and shape and shape[order[-1]] >= _FP8_MIN_ROW
            and node.target is not operator.getitem):
        rows = math.prod(shape) // shape[order[-1]]  # stored in memory order: rows along the unit stride
        after = math.prod(shape) + 4 * rows
        if after < nbytes:
            seconds = 2 * (nbytes + after) / cfg.memory_bytes_per_s + 2 * cfg.op_seconds
            out.append(Choice(node, "fp8", nbytes, after, seconds))
    return out


def ordered_choices(p, saved, cfg: PlanConfig, offload: bool, held: frozenset = frozenset(),
                    inputs: frozenset = frozenset()) -> tuple[list[Choice], dict, int]:
    """The plan's list: every way out of every saved activation, cheapest per byte first (``sequence``
    takes each tensor's first that fits). Also the saved activations by name, and their bytes."""
    nodes = {n.name: n for n in p.fw.graph.nodes}
    available = {nodes[t.name] for t in saved if t.name in nodes}
    # The sizes the backward is given (a recompute's views and expands read them under a variable length).
    available |= {n for n in p.fw.graph.nodes if _is_scalar(n) and p.scalar_in_backward(n) is not None}
    aliased = {t.alias_of for t in saved if t.alias_of is not None}
    activations = {t.name: t for t in saved if not t.is_input and t.alias_of is None and t.bytes > 0
                   and not t.on_host}
    order = {n: i for i, n in enumerate(p.fw.graph.nodes)}
    # Rebuilding from an activation passed in keeps that input, so the tensor is only partly freed; the
    # input then has ways of its own. With host copies, only from an input that can take one: else the
    # tensor's one way (the plan's list takes one per tensor) could bar its own copy, which frees all.
    costly = {n: hinted_bytes(n.meta["val"]) or 0 for n in inputs - available if isinstance(n.meta.get("val"), torch.Tensor)
              and (not offload or memory_order(n.meta["val"]) is not None)}
    ways: list[Choice] = []
    for name, t in activations.items():
        node = nodes.get(name)
        if node is None or name in aliased or not isinstance(node.meta.get("val"), torch.Tensor):
            continue  # a storage several saved views share stays (one rewrite per view would copy it twice)
        ways.extend(choices_for(node, t.bytes, available, cfg, offload, order, held, costly))
    for node, nbytes in costly.items():  # valid once a recompute keeps the input (``sequence``)
        ways.extend(dataclasses.replace(c, keeps=((node, nbytes),))
                    for c in choices_for(node, nbytes, available, cfg, offload, order))
    ways.sort(key=lambda c: (c.price, order[c.node], c.action))
    return ways, activations, sum(t.bytes for t in activations.values())


def sequence(choices: list[Choice]) -> list[Choice]:
    """``choices`` in order, one per tensor (its first), less the conflicts: a recompute reading a
    tensor an earlier choice stores in fp8, and fp8 for what an earlier recompute reads (pinned); either
    would make the recompute lossy. A tensor whose way conflicts takes its next way, at that way's place
    in the order. A recompute may read a tensor that another choice recomputes or copies (exact): it
    then reads it rebuilt or reloaded, since ``apply`` rewrites readers first and each rewrite replaces
    every backward use of its tensor. An input's own ways wait until a recompute keeps it, then come at
    once (their place in the list may have passed: cheaper than what is left); a recompute keeping an
    input an earlier one keeps frees its whole tensor. Independent of the target."""
    seq, pinned, decided, rounded, kept, waiting = [], set(), set(), set(), set(), {}
    todo = list(reversed(choices))
    while todo:
        c = todo.pop()
        if c.node in decided:
            continue  # decided by a cheaper way
        if c.action != "recompute" and c.keeps and c.node not in kept:
            waiting.setdefault(c.node, []).append(c)
            continue
        # The frontier itself, or the storage it views: a saved view is a backward input of its own.
        reads = set(c.frontier) | {view_base(f) for f in c.frontier}
        if (c.action == "recompute" and reads & rounded) or (c.action == "fp8" and c.node in pinned):
            continue
        if c.action == "recompute" and c.keeps:
            new = [(n, b) for n, b in c.keeps if n not in kept]
            c = dataclasses.replace(c, bytes_after=sum(b for _, b in new))
            kept.update(n for n, _ in new)
            todo.extend(reversed([w for n, _ in new for w in waiting.pop(n, [])]))
        seq.append(c)
        decided.add(c.node)
        if c.action == "recompute":
            pinned |= reads
        elif c.action == "fp8":
            rounded.add(c.node)
    return seq


def prefix(seq: list[Choice], estimate: int, target: int, scale: dict | None = None) -> tuple[int, int]:
    """The length of the shortest prefix of ``seq`` that brings ``estimate`` (the bytes saved before it)
    to ``target`` or below, and the bytes saved after it; the whole list if none does. ``scale``: each
    tensor's size where ``estimate`` is counted over its traced size, by name (1 where absent)."""
    k = 0
    while k < len(seq) and estimate > target:
        estimate -= round(seq[k].freed * (scale or {}).get(seq[k].node.name, 1))
        k += 1
    return k, estimate


def bound_scale(fw: fx.GraphModule, activations) -> dict[str, float] | None:
    """For a graph with symbolic sizes (a variable token count), each saved activation's bytes at the
    largest sizes the graph accepts over its bytes at the traced ones, by name: the plan then holds the
    target for the longest batch. ``None`` (and a warning) where a symbolic size has no upper bound:
    the plan holds the target at the traced sizes."""
    nodes = {n.name: n for n in fw.graph.nodes}
    scale, unbounded = {}, {}
    for name in activations:
        val = nodes[name].meta.get("val") if name in nodes else None
        if not isinstance(val, torch.Tensor) or all(isinstance(d, int) for d in val.shape):
            continue
        bounds = [size_bound(d) for d in val.shape]
        if None in bounds:
            unbounded.update((str(d), size_hint(d)) for d, b in zip(val.shape, bounds)
                             if b is None and d.node.expr.is_Symbol)
            continue
        scale[name] = math.prod(bounds) / max(1, math.prod(hinted_shape(val)))
    if unbounded:
        sizes = ", ".join(f"{k} = {v}" for k, v in sorted(unbounded.items()))
        warn(f"memtrain: memory_target is met at this graph's traced sizes ({sizes}); the graph also "
             "runs larger batches, which save more, in proportion. Pad batches to one length, or bound "
             "the size with torch._dynamo.mark_dynamic(tensor, dim, max=N) to plan for the largest.")
        return None
    return scale


@dataclass
class Partitioned:
    """The partitioner's output: what the pass rewrites."""

    fw: fx.GraphModule
    bw: fx.GraphModule
    num_fwd_outputs: int

    def outputs(self) -> list:
        return list(next(n for n in self.fw.graph.nodes if n.op == "output").args[0])

    def set_outputs(self, outs: list) -> None:
        node = next(n for n in self.fw.graph.nodes if n.op == "output")
        node.args = (tuple(outs),)

    def placeholder(self, name: str) -> fx.Node | None:
        return next((n for n in self.bw.graph.nodes if n.op == "placeholder" and n.name == name), None)

    def scalar_in_backward(self, node: fx.Node) -> fx.Node | None:
        """The backward's input holding the forward's symbolic size ``node``: by name, or the same
        expression (the partitioner saves one node per size, not every node that computes it)."""
        by_name, by_expr = self._backward_scalars
        found = by_name.get(node.name)
        return found if found is not None else by_expr.get(node.meta["val"].node.expr)

    @functools.cached_property
    def _backward_scalars(self) -> tuple[dict, dict]:
        # Looked up for every size node of the forward; the plan never adds a size to the backward.
        inputs = [n for n in self.bw.graph.nodes if n.op == "placeholder" and _is_scalar(n)]
        return {n.name: n for n in inputs}, {n.meta["val"].node.expr: n for n in reversed(inputs)}

    def held_inputs(self, held: list[bool]) -> frozenset:
        """The forward's inputs flagged in ``held`` (one flag per input; none if the counts differ)."""
        inputs = [n for n in self.fw.graph.nodes if n.op == "placeholder"]
        if len(held) != len(inputs):
            return frozenset()
        return frozenset(n for n, h in zip(inputs, held) if h)


def _first_user(node: fx.Node) -> fx.Node:
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return min(node.users, key=order.__getitem__)


def _add_placeholder(bw: fx.Graph, before: fx.Node, like: fx.Node, name: str) -> fx.Node:
    """A backward input for the new saved tensor ``like``, at the place of ``before``'s. Its own name: the
    forward's (``getitem_14``) may be taken in the backward, and a placeholder's name is its argument's."""
    with bw.inserting_before(before):
        ph = bw.placeholder(name)
    if ph.name != name:
        raise AssertionError(f"{NAME}: placeholder name {name!r} is taken")
    ph.meta.update(val=like.meta["val"])
    return ph


def _compute_seconds(node: fx.Node, cfg: PlanConfig) -> float:
    """What ``node`` gives a copy to run beside: its estimated time (none for a view), nothing for
    another copy's ops."""
    if node.op != "call_function" or node.target in _copy_ops():
        return 0.0
    return _op_seconds(node, cfg)


def _after_compute(start: fx.Node, seconds: float, cfg: PlanConfig) -> fx.Node:
    """Where a copy started after ``start`` has had ``seconds`` of the graph's estimated compute to run
    beside: the node to insert its wait before (the output at the latest)."""
    n, run = start.next, 0.0
    while n.op != "output" and run < seconds:
        run += _compute_seconds(n, cfg)
        n = n.next
    return n


def _before_compute(use: fx.Node, seconds: float, cfg: PlanConfig) -> fx.Node:
    """Where to start a copy that ``use`` waits for, so that it has ``seconds`` of estimated compute to
    run beside (after the graph's inputs at the earliest)."""
    n, run = use, 0.0
    while n.prev.op not in ("placeholder", "root") and run < seconds:
        n = n.prev
        run += _compute_seconds(n, cfg)
    return n


def apply(p: Partitioned, chosen: list[Choice], cfg: PlanConfig) -> None:
    """Rewrite the forward's saved outputs and the backward's placeholders, one choice at a time, the
    latest-made tensor first: a recompute is copied into the backward reading its inputs' placeholders
    before any of them is rewritten, and each rewrite then replaces every use, the copy's included."""
    position = {n: i for i, n in enumerate(p.fw.graph.nodes)}
    for c in sorted(chosen, key=lambda c: -position[c.node]):
        node, outs = c.node, p.outputs()
        slot = outs.index(node, p.num_fwd_outputs)
        ph = p.placeholder(node.name)
        if ph is None:
            raise AssertionError(f"{NAME}: {node.name} is saved but not a backward input")
        if not ph.users:
            continue
        if c.action == "recompute":
            # Held inputs the closure reads and the backward does not get yet: saved in the slot freed,
            # in the same order on both sides.
            new = sorted((f for f in c.frontier if f.op == "placeholder" and not _is_scalar(f)
                          and p.placeholder(f.name) is None), key=lambda f: f.name)
            for f in new:
                _add_placeholder(p.bw.graph, ph, f, f.name)
            back = _copy_into_backward(p, c, _first_user(ph))
            ph.replace_all_uses_with(back)
            p.bw.graph.erase_node(ph)
            p.set_outputs(outs[:slot] + new + outs[slot + 1:])
            continue
        # Stored in memory order (a transposed tensor as its contiguous permutation) and viewed back in
        # the backward, so its readers see the forward's strides: the copies are dense.
        order = memory_order(node.meta["val"])
        undo = tuple(sorted(range(len(order)), key=order.__getitem__))
        use = _first_user(ph)
        # Right after the tensor is made (an input: after the inputs), so the device copy is freed after
        # its last forward use.
        made = first_non_placeholder(p.fw.graph) if node.op == "placeholder" else node.next
        if c.action == "offload":
            device = node.meta["val"].device
            copy = c.bytes / cfg.host_bytes_per_s
            host = insert_traced(p.fw.graph, lambda x: memtrain.offload(x.permute(order)), [node],
                                 before=made, tag=None, name=NAME)
            insert_traced(p.fw.graph, lambda h, x: memtrain.offload_wait(h, x), [host, node],
                          before=_after_compute(host, copy, cfg), tag=None, name=NAME)
            new_ph = _add_placeholder(p.bw.graph, ph, host, f"{node.name}_on_host")
            y = insert_traced(p.bw.graph, lambda h: memtrain.reload(h, device), [new_ph],
                              before=_before_compute(use, copy, cfg), tag=None, name=NAME)
            insert_traced(p.bw.graph, lambda y: memtrain.reload_wait(y), [y], before=use, tag=None, name=NAME)
            p.set_outputs(outs[:slot] + [host] + outs[slot + 1:])
        else:
            dtype = node.meta["val"].dtype
            q, scale = insert_traced(p.fw.graph, lambda x: memtrain.fp8_quantize(x.permute(order)), [node],
                                     before=made, tag=None, name=NAME)
            q_ph = _add_placeholder(p.bw.graph, ph, q, f"{node.name}_fp8")
            s_ph = _add_placeholder(p.bw.graph, ph, scale, f"{node.name}_fp8_scale")
            y = insert_traced(p.bw.graph, lambda a, b: memtrain.fp8_dequantize(a, b, dtype), [q_ph, s_ph],
                              before=use, tag=None, name=NAME)
            p.set_outputs(outs[:slot] + [q, scale] + outs[slot + 1:])
        back = y if order == tuple(range(len(order))) else insert_traced(
            p.bw.graph, lambda t: t.permute(undo), [y], before=use, tag=None, name=NAME)
        ph.replace_all_uses_with(back)
        p.bw.graph.erase_node(ph)
    for gm in (p.fw, p.bw):
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()


def _copy_into_backward(p: Partitioned, c: Choice, before: fx.Node) -> fx.Node:
    """The recompute: a copy of ``c.closure`` in the backward, reading the frontier's placeholders."""
    env = {f: p.scalar_in_backward(f) if _is_scalar(f) else p.placeholder(f.name) for f in c.frontier}
    lost = sorted(f.name for f, ph in env.items() if ph is None)
    if lost:  # apply() copies a recompute before what it reads is rewritten
        raise AssertionError(f"{NAME}: recompute of {c.node.name} reads {lost}, no longer backward inputs")
    with p.bw.graph.inserting_before(before):
        for n in c.closure:
            new = p.bw.graph.node_copy(n, lambda a: env[a])
            new.meta["memtrain_pass"] = NAME
            env[n] = new
    return env[c.node]


def plan_memory(p: Partitioned, saved, target: int, cfg: PlanConfig, held: frozenset = frozenset(),
                shares: int = 1, inputs: frozenset = frozenset()) -> MemoryPlan:
    """Plan and apply on the partitioned graphs; ``saved``: their saved tensors
    (``reporting.saved_tensors``); ``held``: the forward's parameter inputs (free to save); ``inputs``:
    its activation inputs (saving one costs its bytes); ``target``: this graph's share of the step's
    target, one of ``shares`` equal ones."""
    device = _device(p.fw)
    offload = cfg.offload if cfg.offload is not None else device in ("cuda", "meta")
    choices, activations, before = ordered_choices(p, saved, cfg, offload, held, inputs)
    seq = sequence(choices)
    scale = bound_scale(p.fw, [*activations, *(c.node.name for c in seq if c.node.name not in activations)])
    at_bound = None if not scale else round(sum(t.bytes * scale.get(n, 1) for n, t in activations.items()))
    k, planned = prefix(seq, before if at_bound is None else at_bound, target, scale)
    if planned > target:
        raise ValueError(
            f"memtrain memory_target {fmt_bytes(target * shares)}"
            + ("" if shares == 1 else f" ({fmt_bytes(target)} for each of the step's {shares} runs of compiled "
               "graphs: every layer's, and the head's, under compile_blocks)")
            + " cannot be met: this graph saves "
            f"{fmt_bytes(before if at_bound is None else at_bound)}"
            f"{'' if at_bound is None else ' at the largest sizes it accepts'}, and the "
            f"smallest the planner reaches is {fmt_bytes(planned)} (recompute={cfg.recompute}, offload="
            f"{offload}, fp8={cfg.fp8}). Raise the target"
            + ("" if cfg.fp8 else ", allow plan.fp8") + ("" if offload else ", allow plan.offload") + ".")
    apply(p, seq[:k], cfg)
    result = _result(activations, seq[:k], target, before, before - sum(c.freed for c in seq[:k]))
    if at_bound is not None:
        result.counters.update(bound_before=at_bound, bound_after=planned)
    return result


def _result(activations: dict, chosen: list[Choice], target: int, before: int, planned: int) -> MemoryPlan:
    by_name = {c.node.name: c for c in chosen}
    rows = [(name, tuple(t.shape), t.dtype, t.bytes) for name, t in activations.items()]
    # an input a recompute keeps, then copied to the host or stored in fp8
    rows += [(c.node.name, tuple(hinted_shape(c.node.meta["val"])), str(c.node.meta["val"].dtype).removeprefix("torch."),
              c.bytes) for c in chosen if c.node.name not in activations]
    records, counts = [], {"recompute": 0, "offload": 0, "fp8": 0, "keep": 0}
    for name, shape, dtype, nbytes in rows:
        c = by_name.get(name)
        action = c.action if c else "keep"
        counts[action] += 1
        records.append({"tensor": name, "shape": shape, "dtype": dtype, "bytes": nbytes, "action": action,
                        "bytes_after": c.bytes_after if c else nbytes, "seconds": c.seconds if c else 0.0})
    counters = {"target": target, "before": before, "after": planned,
                "seconds": sum(c.seconds for c in chosen), **counts}
    return MemoryPlan(NAME, records, [], counters)


@functools.cache
def _copy_ops() -> frozenset:
    """The host copies' start and wait ops (registered by ``memcompile.ops``, imported by the plan)."""
    return frozenset({memtrain.offload.default, memtrain.offload_wait.default, memtrain.reload.default,
                      memtrain.reload_wait.default})


def _state_ops() -> set:
    """Compression's state ops (they read or advance per-layer state: once a step, never rerun)."""
    from memcompile.passes.compression import METHODS

    return {m.state_op for m in METHODS.values()}


def backward_recompute_seconds(bw: fx.GraphModule, cfg: PlanConfig) -> float:
    """Estimated time of the forward ops a backward graph reruns (the partitioner's recomputation and
    the planner's), at ``cfg``'s rates: the same measure for a ``recompute_budget`` and a plan."""
    return group_seconds([n for n in bw.graph.nodes
                          if n.op == "call_function" and partitioner_tag(n) == "is_forward"], cfg)


def transfer_seconds(result: MemoryPlan | None) -> float:
    """The plan's estimated time besides recomputation: host copies and fp8 conversions."""
    if result is None:
        return 0.0
    return sum(r["seconds"] for r in result.rewritten if r["action"] in ("offload", "fp8"))


def _device(gm: fx.GraphModule) -> str:
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and n.op != "placeholder":
            return val.device.type
    return "cpu"


class PlanMemory(GraphPass):
    """The pass; only with ``memory_target``. On the partitioned graphs: it plans what the partitioner
    and every joint pass left saved."""

    name, stage = NAME, "partitioned"

    def enabled(self) -> bool:
        return self.config.memory_target is not None

    def options(self) -> tuple:
        return (self.config.memory_target, self.config.plan)

    def __call__(self, p: Partitioned, ctx) -> MemoryPlan:
        # Under compile_blocks a block's graph runs once per layer it serves and the head's once: each
        # run gets an equal share of the step's target, so together they keep at most the target.
        target = self.config.memory_target // ctx.target_shares
        if ctx.target_shares == 1:
            _warn_if_split(ctx.report.frame_id, self.config.memory_target)
        saved = saved_tensors(p.fw, p.num_fwd_outputs, ctx.inputs_held)
        activations_in = [not held and not param for held, param in zip(ctx.inputs_held, ctx.parameter_inputs)]
        plan = plan_memory(p, saved, target, self.config.plan, p.held_inputs(ctx.parameter_inputs), ctx.target_shares,
                           p.held_inputs(activations_in))
        plan.counters["step_target"] = self.config.memory_target
        return plan


def _warn_if_split(frame_id: int | None, target: int) -> None:
    """A graph break splits a step into graphs compiled one by one, each planned against the whole
    target before the next is seen: say so once a second one comes."""
    frames = {r.frame_id for r in reports() if NAME in r.passes and not r.region and not r.inference}
    frames.add(frame_id)
    if len(frames) > 1:
        warn(f"memtrain: memory_target holds for each compiled graph, each time it runs, and {len(frames)} "
             f"graphs have been planned since memcompile.clear_reports() (graph breaks split the model: "
             f"torch._dynamo.explain lists them; a break inside a repeated layer has one graph run once "
             f"per layer), so together they may keep {len(frames)} or more times {fmt_bytes(target)}. "
             "Remove the breaks, or compile the layers with memcompile.compile_blocks, which shares the "
             "target among them.")
