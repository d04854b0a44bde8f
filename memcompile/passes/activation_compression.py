"""Joint-graph pass: save a compressed linear input instead of the input itself (VeLoRA, CompAct).

For every linear layer whose input activation ``x`` (``N x D``) is used in the backward only by the
weight gradient, the forward saves ``z`` (VeLoRA: one scalar per sub-token, ``N x G``; CompAct:
``x P``, ``N x r``) and the backward computes the weight gradient from ``z``. Forward outputs and input
gradients are untouched; only the weight gradient becomes the method's approximation
``grad_W = grad_out^T @ x_hat``, evaluated in the compressed space, which is also cheaper:

* VeLoRA, ``x_hat = ungroup(z v^T) * scale``: ``grad_W = ((grad_out^T z) ⊗ v) * scale``.
* CompAct, ``x_hat = z P^T``: ``grad_W = (grad_out^T z) P^T``, ``P`` regenerated from a saved seed.

The methods are plug-ins, one file each in ``memcompile/passes/compression/``: this pass finds the
layers, groups them by input, asks the method (``MemtrainConfig.activation``) whether each fits and
traces the method's ``project`` and ``weight_grad`` into the graph.

Both linear forms are handled: ``mm(x, t(W))`` (``nn.Linear``, weight grad ``mm(t(g), x)``) and
``mm(x, W)`` (GPT-2's ``Conv1D``, weight grad ``mm(t(x), g)``). Layers that share one input (q/k/v,
gate/up, the LoRA A of several targets on one input) share one compressed tensor.

Use it on its own on any AOTAutograd joint graph (``partitioner_tag`` metadata present)::

    result = compress_activations(joint_gm, MemtrainConfig(activation="velora"), param_names)
    print(result.rewritten, result.skipped)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx as fx

from memcompile._targets import matches
from memcompile._torch_compat import BACKWARD_TAG, FORWARD_TAG, is_checkpointed, must_save, partitioner_tag, size_hint
from memcompile._warn import warn
from memcompile.config import MemtrainConfig

from ._graph import TRANSPOSE_OPS, VIEW_OPS, first_non_placeholder, insert_traced, is_call, view_base, view_family
from .base import GraphPass, PassContext, PassResult, module_sources
from .compression import METHODS, CompressionMethod, Group

log = logging.getLogger(__name__)
aten = torch.ops.aten

NAME = "activation_compression"
# A dtype cast as AOTAutograd writes it, and as Inductor's decompositions rewrite it.
CAST_OPS = frozenset({aten._to_copy.default, torch.ops.prims.convert_element_type.default})
CHECKPOINTED = "inside an activation-checkpointed region: its input is recomputed, not saved"


@dataclass
class Layer:
    """One linear layer found in the joint graph."""

    name: str  # parameter path of the weight, e.g. "model.layers.0.self_attn.q_proj.lora_A.default"
    forward: fx.Node  # mm/addmm in the forward
    x: fx.Node  # its 2-D input
    weight: fx.Node  # the primal placeholder of the weight
    conv1d: bool  # weight stored (in, out) as GPT-2's Conv1D
    wgrads: list[fx.Node]  # backward mm nodes computing the weight gradient from x


class CompressionResult(PassResult):
    """The pass's result: one record per compressed group of layers; ``approximated`` maps each
    compressed weight to the method of its gradient."""

    def describe(self, r: dict) -> str:
        return (f"compressed {r['input']} {tuple(r['shape'])} {r['dtype']} -> {tuple(r['saved_shape'])}"
                f" for {', '.join(r['layers'])}")

    @property
    def predicted_saving(self) -> int:
        """Each compressed input's ``N*D`` elements become ``N*G`` (VeLoRA) or ``N*r`` (CompAct), plus a
        vector or seed per group."""
        return sum(g["bytes_before"] - g["bytes_after"] - g["state_bytes"] for g in self.rewritten)


class CompressActivations(GraphPass):
    """The pass, on the joint graph (forward and backward of a layer in one graph)."""

    name, stage = NAME, "joint"

    def options(self) -> tuple:
        c = self.config
        section = getattr(c, c.activation, None)
        return (c.activation, c.target_patterns, c.exclude_patterns, section)

    def sources(self):
        # The chosen method's file is found by name at run time, not by an import this file makes.
        method = METHODS.get(self.config.activation)
        return super().sources() + (module_sources(method.module) if method else ())

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> CompressionResult:
        return compress_activations(gm, self.config, ctx.input_names, ctx.decompositions,
                                    caller_held=ctx.inputs_held, in_block=ctx.in_block)


def _weight_of(node: object, primals: dict[fx.Node, str]) -> tuple[fx.Node | None, int]:
    """Follow views and casts from a matmul operand to a primal; also count transposes on the way."""
    transposes = 0
    while isinstance(node, fx.Node) and node not in primals:
        if is_call(node, TRANSPOSE_OPS):
            transposes += 1
        elif not (is_call(node, VIEW_OPS) or is_call(node, CAST_OPS | {aten.clone.default})):
            return None, 0
        node = node.args[0]
    return (node, transposes) if isinstance(node, fx.Node) else (None, 0)


def _gradient_matmuls(graph: fx.Graph, primals: dict[fx.Node, str]) -> dict[fx.Node, set[fx.Node]] | None:
    """For each primal, the backward ``mm`` nodes its gradient output is made of (through views, casts
    and the sums of a weight used more than once); ``None`` if the graph's outputs do not end with one
    gradient per primal, as AOTAutograd's joint graphs do."""
    out = next(n for n in reversed(graph.nodes) if n.op == "output").args[0]
    if not isinstance(out, (list, tuple)) or len(out) < len(primals):
        return None
    found: dict[fx.Node, set[fx.Node]] = {}
    for primal, grad in zip(primals, out[len(out) - len(primals):]):
        mms, todo = set(), [grad]
        while todo:
            n = todo.pop()
            if is_call(n, {aten.mm.default}):
                mms.add(n)
            elif is_call(n, {aten.add.Tensor}):
                todo.extend(a for a in n.args if isinstance(a, fx.Node))
            elif is_call(n, VIEW_OPS) or is_call(n, CAST_OPS | {aten.clone.default}):
                todo.append(n.args[0])
        found[primal] = mms
    return found


def find_linears(graph: fx.Graph, primals: dict[fx.Node, str]) -> list[Layer]:
    """Forward ``mm``/``addmm`` nodes with a primal weight, and their weight-gradient matmuls."""
    # Layers that read one input (a frozen base and its LoRA A, gate and up on a 2-D input) each see
    # every ``mm(t(g), x)``: only the matmuls that make a weight's own gradient output are its own.
    grad_mms = _gradient_matmuls(graph, primals)
    layers = []
    for n in graph.nodes:
        if partitioner_tag(n) != FORWARD_TAG or not is_call(n, {aten.mm.default, aten.addmm.default}):
            continue
        x, w = (n.args[0], n.args[1]) if n.target == aten.mm.default else (n.args[1], n.args[2])
        weight, transposes = _weight_of(w, primals)
        if weight is None or not isinstance(x, fx.Node):
            continue
        conv1d = transposes % 2 == 0
        wgrads = []
        for u in x.users:
            if partitioner_tag(u) != BACKWARD_TAG:
                continue
            if not conv1d and is_call(u, {aten.mm.default}) and u.args[1] is x:
                wgrads.append(u)  # mm(t(g), x)
            elif conv1d and is_call(u, TRANSPOSE_OPS):
                wgrads.extend(m for m in u.users if is_call(m, {aten.mm.default}) and m.args[0] is u)
        if grad_mms is not None:
            wgrads = [m for m in wgrads if m in grad_mms.get(weight, ())]
        if wgrads:  # frozen weights (no gradient) are not candidates
            layers.append(Layer(primals[weight], n, x, weight, conv1d, wgrads))
    return layers


def _warn_about_silent_skips(config: MemtrainConfig, method: CompressionMethod, layers: list[Layer],
                             skipped: list[dict], unfit: list[str]) -> None:
    """Options that would make the pass compress nothing without a word: targets that match no layer,
    and what the method says of the layers its ``check`` turned down (``unfit``). A graph whose only
    layers are excluded on purpose (under ``compile_blocks``, the head's ``lm_head``) says nothing."""
    names = [l.name.removesuffix(".weight") for l in layers]
    if (layers and sum(s["reason"] == "not targeted" for s in skipped) == len(layers)
            and not all(matches(name, config.exclude_patterns) for name in names)):
        warn(f"memtrain: targets={list(config.target_patterns)} (exclude={list(config.exclude_patterns)}) "
             f"match none of the {len(names)} trainable linear layers of this graph, so nothing is "
             f"compressed; their names look like {names[:3]}: set `targets` to match them "
             "(patterns match a path, a dotted suffix or a path component)")
    if any(s["reason"] == CHECKPOINTED for s in skipped):
        warn("memtrain: activation compression leaves the layers inside activation-checkpointed "
             "regions exact (gradient checkpointing recomputes their inputs instead of saving them, so "
             "compressing them saves nothing); memcompile.report() lists them. To compress them, turn "
             "checkpointing off (model.gradient_checkpointing_disable()) and set memory_target to bound what "
             "the step keeps")
    message = method.skip_warning(getattr(config, method.name), unfit) if unfit and method.skip_warning else None
    if message:
        warn(message)


def _static_2d(node: fx.Node) -> tuple[int, int] | None:
    """``(N, D)`` of a 2-D input with a static width; a symbolic token count ``N`` is replaced by its
    hint (used only for byte counts and to pick the cheaper matmul order)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 2 or not isinstance(val.shape[1], int):
        return None
    n = size_hint(val.shape[0])
    return (n, int(val.shape[1])) if n is not None else None


def compress_activations(gm: fx.GraphModule | fx.Graph, config: MemtrainConfig,
                         param_names: Sequence[str] | None = None,
                         decompositions: dict | None = None,
                         caller_held: Sequence[bool] | None = None, *, in_block: bool = False) -> CompressionResult:
    """Rewrite the joint graph in place. ``param_names[i]`` names primal ``i`` (dotted parameter
    path); without it placeholders are named by their graph names and pattern matching sees those.
    ``caller_held[i]``: whether the caller keeps input ``i`` alive anyway (a parameter, an argument);
    an input it does not hold (an activation an earlier graph produced, as where DDP splits a graph)
    is compressed like any activation. Without it every input counts as held.
    ``in_block``: the graph is one block that serves several layers, its names relative to the block."""
    graph = gm if isinstance(gm, fx.Graph) else gm.graph
    result = CompressionResult(NAME)
    if config.activation == "none":
        return result
    method = METHODS[config.activation]
    options = getattr(config, method.name)

    placeholders = [n for n in graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents")]
    names = list(param_names) if param_names is not None and len(param_names) == len(placeholders) else None
    if param_names is not None and names is None:
        log.warning("memtrain: %d parameter names for %d graph inputs; matching layers by graph names",
                    len(param_names), len(placeholders))
    primals = {p: (names[i] if names else p.name) for i, p in enumerate(placeholders)}
    held = {p for i, p in enumerate(placeholders)
            if caller_held is None or len(caller_held) != len(placeholders) or caller_held[i]}

    all_layers = find_linears(graph, primals)
    wgrad_owner = {mm: l for l in all_layers for mm in l.wgrads}
    groups: dict[tuple, list[Layer]] = {}
    unfit: list[str] = []  # skipped by the method's check
    for layer in all_layers:
        name = layer.name.removesuffix(".weight")
        if matches(name, config.exclude_patterns) or not matches(name, config.target_patterns):
            result.skipped.append({"layer": name, "reason": "not targeted"})
            continue
        if is_checkpointed(layer.forward):
            # Its input is recomputed in the backward, never saved: compressing would save z on top of
            # the checkpoint's own inputs, and approximate the gradient for nothing.
            result.skipped.append({"layer": name, "reason": CHECKPOINTED})
            continue
        shape = _static_2d(layer.x)
        if shape is None:
            result.skipped.append({"layer": name, "reason": "input is not 2-D with a static width"})
            continue
        reason = method.check(options, shape[1])
        if reason is not None:
            result.skipped.append({"layer": name, "reason": reason})
            unfit.append(name)
            continue
        groups.setdefault((_value_root(layer.x), layer.x.meta["val"].dtype, shape), []).append(layer)
    _warn_about_silent_skips(config, method, all_layers, result.skipped, unfit)

    for key_, layers in list(groups.items()):
        # Compressing frees memory only if nothing else in the backward reads the input (or a view of it).
        reason = _frees_nothing(layers, wgrad_owner, held)
        if reason:
            del groups[key_]
            for layer in layers:
                result.skipped.append({"layer": layer.name.removesuffix(".weight"),
                                       "reason": "frees nothing: " + reason})

    # Inserting nodes never reorders the existing ones, so positions taken now stay valid.
    position = {node: i for i, node in enumerate(graph.nodes)}
    for (_, _, (n, d)), layers in groups.items():
        names_ = [l.name.removesuffix(".weight") for l in layers]
        key = names_[0]
        # The compression reads the input where it first exists: after the earliest member of the group.
        x = min((l.x for l in layers), key=position.__getitem__)
        base = view_base(x)
        val = x.meta["val"]
        plan = method.plan(options, Group(key, n, d, val.dtype, val.device, in_block))
        anchor = x.next if x.op != "placeholder" else first_non_placeholder(graph)
        z, state = insert_traced(graph, plan.project, [x, layers[0].weight], before=anchor, tag=FORWARD_TAG,
                                 decompositions=decompositions, name=NAME)
        # Reading or advancing the state twice (a recompute in the backward) would count a step twice
        # or re-estimate v from another batch: these nodes are saved, never recomputed.
        assert is_call(state, {method.state_op}), state
        must_save(state)
        for layer in layers:
            for mm in layer.wgrads:
                if layer.conv1d:
                    t_x, other = mm.args[0], mm.args[1]
                    new = insert_traced(graph, plan.weight_grad_conv1d, [other, z, state], before=mm, tag=BACKWARD_TAG,
                                        decompositions=decompositions, name=NAME)
                else:
                    t_x, other = None, mm.args[0]
                    new = insert_traced(graph, plan.weight_grad, [other, z, state], before=mm, tag=BACKWARD_TAG,
                                        decompositions=decompositions, name=NAME)
                mm.replace_all_uses_with(new)
                graph.erase_node(mm)
                if t_x is not None and not t_x.users:
                    graph.erase_node(t_x)
            result.approximated[layer.name] = method.name
        entry = {"layers": names_, "input": base.name, "shape": (n, d), "dtype": str(val.dtype).removeprefix("torch."),
                 "method": method.name, "saved_shape": (n, plan.width),
                 # what else the forward keeps per group: VeLoRA's fp32 vector, CompAct's int64 seed
                 "state_bytes": plan.state_bytes,
                 "bytes_before": n * d * val.element_size(), "bytes_after": n * plan.width * val.element_size()}
        result.rewritten.append(entry)
    result.counters = {"groups": len(result.rewritten), "layers": len(result.approximated),
                       "skipped": len(result.skipped)}
    graph.lint()
    if isinstance(gm, fx.GraphModule):
        gm.recompile()
    return result


def _value_root(x: fx.Node) -> fx.Node:
    """The tensor whose values ``x`` holds, through views and dtype casts.

    PEFT casts the layer input to the adapters' dtype once per adapter, so q/k/v's LoRA A inputs are
    three equal fp32 copies of one bf16 tensor: grouping by this root lets them share one compressed
    tensor (their dtype is part of the group key too). Under Inductor the casts are
    ``prims.convert_element_type``: missing them made one group per copy, each predicted to free a
    copy the partitioner, which keeps one and recomputes the others, never saved.
    """
    while True:
        x = view_base(x)
        if is_call(x, CAST_OPS) and set(x.kwargs) <= {"dtype"} and isinstance(x.args[0], fx.Node):
            x = x.args[0]
        else:
            return x


def _frees_nothing(layers: list[Layer], wgrad_owner: dict[fx.Node, Layer],
                  held: set[fx.Node] | None = None) -> str | None:
    """Why compressing the inputs of ``layers`` would free no memory, or None if it would. ``held``:
    the graph inputs the caller keeps alive anyway (None: all of them)."""
    bases = {view_base(l.x) for l in layers}
    if any(b.op == "placeholder" and (held is None or b in held) for b in bases):
        return "the input is a graph input, held by the caller anyway"
    ours = {mm for l in layers for mm in l.wgrads}
    others = []
    for member in (m for b in bases for m in view_family(b)):
        for u in member.users:
            if partitioner_tag(u) != BACKWARD_TAG or u in ours:
                continue
            if is_call(u, TRANSPOSE_OPS) and all(m in ours for m in u.users):
                continue  # Conv1D: t(x) feeding only our weight-gradient matmuls
            if is_call(u, VIEW_OPS):
                continue  # views are family members, checked themselves
            if is_call(u, TRANSPOSE_OPS):
                owners = [wgrad_owner[m] for m in u.users if m in wgrad_owner]
            else:
                owners = [wgrad_owner[u]] if u in wgrad_owner else []
            others.extend(f"the weight gradient of {o.name.removesuffix('.weight')} (not compressed)"
                          for o in owners)
            if not owners:
                others.append(f"{u.target} in the backward")
    if others:
        return "the input is still used by " + ", ".join(sorted(set(others)))
    return None
