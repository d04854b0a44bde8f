"""FX pass: swap targeted linears of a GraphModule for an NF4 frozen base + DyLoRA adapter.

The graph-level twin of ``memcompile.prepare``, for models that arrive as a ``GraphModule``
(``torch.fx.symbolic_trace(model)`` or ``torch.export.export(model, args).module()``). It finds

* ``call_module`` nodes of a targeted ``nn.Linear`` / ``bitsandbytes.nn.Linear4bit``;
* ``F.linear`` / ``aten.linear`` calls whose weight (and bias) come from ``get_attr`` parameters, targeted
  by the owner path of the weight (``layers.0.w_q`` for ``layers.0.w_q.weight``, or the parameter path);

builds a ``LoRALinear`` for each (the same conversion as ``prepare``), registers it on the GraphModule
and inlines its computation in place of the call: ``memtrain::nf4_linear`` on the packed weight plus
the masked adapter. The dense weight is deleted from the GraphModule once nothing else reads it.

The new adapters belong to the returned GraphModule; give ``result.new_params`` to the optimizer. Other
parameters are left as they were. ``RankSampler``/``set_rank`` work on the GraphModule as on a model.

This runs on module-level graphs, before ``torch.compile``: parameters created inside a backend would
be invisible to the optimizer.

Example::

    gm = torch.fx.symbolic_trace(model)
    result = swap_nf4_lora(gm, {"lora": {"r_max": 8, "targets": ["q_proj", "v_proj"]}})
    opt = torch.optim.AdamW(result.new_params, lr=2e-4)
"""
from __future__ import annotations

import hashlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch.fx as fx
import torch.nn as nn

from memcompile._targets import matches
from memcompile._torch_compat import LINEAR_FUNCTIONS
from memcompile.adapt import convert_layer, lora_config
from memcompile.config import LoRAConfig, MemtrainConfig
from memcompile.lora import LoRALinear
from memcompile.passes._graph import linear_args

log = logging.getLogger(__name__)

NAME = "nf4_lora"


@dataclass
class SwapResult:
    gm: fx.GraphModule
    new_params: list[nn.Parameter] = field(default_factory=list)  # lora_A, lora_B of every new layer
    replaced: list[dict] = field(default_factory=list)  # {"target", "module", "kind", "shape"}
    skipped: list[dict] = field(default_factory=list)  # {"target", "reason"}
    counters: dict[str, int] = field(default_factory=dict)


def uuid(config: MemtrainConfig | LoRAConfig | Mapping[str, Any] | None) -> str:
    """Cache key: this file's source and the LoRA options."""
    h = hashlib.sha256(inspect.getsource(inspect.getmodule(uuid)).encode())
    h.update(repr(lora_config(config)).encode())
    return h.hexdigest()


def _attr(gm: fx.GraphModule, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _free_name(gm: fx.GraphModule, path: str) -> str:
    name, i = path, 0
    while True:
        try:
            _attr(gm, name)
        except AttributeError:
            return name
        i += 1
        name = f"{path}_{i}"


# The parts of an adapter, as ``LoRALinear`` and PEFT name them. A traced graph keeps module paths, not
# classes (its owners of ``q_proj.base_layer`` are plain modules), so an adapter is known by these names.
_ADAPTER_PARTS = frozenset({"base_layer", "lora_A", "lora_B"})


def _in_adapter(path: str) -> bool:
    """Whether ``path`` lies inside an adapter (its base layer, its A or B): a pattern that names the layer
    matches them too, as path components, but they are never targets themselves."""
    return not _ADAPTER_PARTS.isdisjoint(path.split("."))


def _inline(gm: fx.GraphModule, node: fx.Node, path: str, layer: LoRALinear, x: fx.Node) -> fx.Node:
    """Trace ``layer`` and copy its graph before ``node``, its attributes prefixed with ``path``."""
    sub = fx.symbolic_trace(layer).graph
    env: dict[fx.Node, fx.Node] = {}
    with gm.graph.inserting_before(node):
        for n in sub.nodes:
            if n.op == "placeholder":
                env[n] = x
            elif n.op == "output":
                return env[n.args[0]]
            else:
                new = gm.graph.node_copy(n, lambda a: env[a])
                if n.op in ("get_attr", "call_module"):
                    new.target = f"{path}.{n.target}"
                new.meta["memtrain_pass"] = NAME
                env[n] = new
    raise AssertionError("traced layer has no output")


def _only_holds(gm: fx.GraphModule, owner: str, node: fx.Node, attrs: tuple) -> bool:
    """Whether module ``owner`` holds nothing but the ``get_attr`` tensors ``attrs``, read only by ``node``."""
    if not owner:
        return False
    try:
        module = gm.get_submodule(owner)
    except AttributeError:
        return False
    nodes = [a for a in attrs if a is not None]
    held = {n for n, _ in module.named_parameters(recurse=False)} | {n for n, _ in module.named_buffers(recurse=False)}
    if type(module) is not nn.Module or list(module.children()) or held != {a.target.rpartition(".")[2] for a in nodes}:
        return False
    targets = {a.target for a in nodes}
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target in targets]
    return all(set(r.users) == {node} for r in readers)


def _drop_if_unused(gm: fx.GraphModule, attr_node: fx.Node | None) -> None:
    """Erase a ``get_attr`` node without users and, if no other node reads it, the attribute itself."""
    if attr_node is None or attr_node.op != "get_attr" or attr_node.users:
        return
    target = attr_node.target
    gm.graph.erase_node(attr_node)
    if any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
        return
    owner, _, name = target.rpartition(".")
    delattr(gm.get_submodule(owner) if owner else gm, name)


def swap_nf4_lora(gm: fx.GraphModule, config: MemtrainConfig | LoRAConfig | Mapping[str, Any] | None = None
                  ) -> SwapResult:
    """Replace targeted linear calls in ``gm`` by NF4 (or dense, ``quant="none"``) + DyLoRA; in place."""
    cfg = lora_config(config)
    result = SwapResult(gm)
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if (isinstance(module, LoRALinear) or not matches(node.target, cfg.targets)
                    or _in_adapter(node.target)):
                continue
            if len(node.args) != 1 or node.kwargs:
                result.skipped.append({"target": node.target, "reason": "called with more than one input"})
                continue
            layer = convert_layer(module, cfg, node.target)
            if layer is None:
                result.skipped.append({"target": node.target, "reason": f"{type(module).__name__} is not supported"})
                continue
            path, x, kind = node.target, node.args[0], "module"
            gm.set_submodule(path, layer)
            dead, take_owner = (), False
        elif node.op == "call_function" and node.target in LINEAR_FUNCTIONS:
            x, w, b = linear_args(node)
            if not (isinstance(w, fx.Node) and w.op == "get_attr" and isinstance(_attr(gm, w.target), nn.Parameter)):
                continue
            if _in_adapter(w.target):
                continue
            owner = w.target.removesuffix(".weight")
            if not (matches(owner, cfg.targets) or matches(w.target, cfg.targets)):
                continue
            if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"
                                      and isinstance(_attr(gm, b.target), nn.Parameter)):
                result.skipped.append({"target": w.target, "reason": "bias is not a parameter"})
                continue
            weight = _attr(gm, w.target)
            dense = nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None, device="meta")
            dense.weight = weight
            if b is not None:
                dense.bias = _attr(gm, b.target)
            layer = convert_layer(dense, cfg, w.target)
            kind, dead = "function", (w, b)
            # torch.export keeps each layer's parameters in an otherwise empty module: the new layer takes
            # its place (and name) once the dense tensors are gone.
            take_owner = _only_holds(gm, owner, node, dead)
            path = owner if take_owner else _free_name(gm, w.target.replace(".", "_") + "_lora")
            if not take_owner:
                gm.set_submodule(path, layer)
        else:
            continue
        out = _inline(gm, node, path, layer, x)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        for d in dead:
            _drop_if_unused(gm, d)
        if take_owner:
            gm.set_submodule(path, layer)
        result.new_params += [layer.lora_A, layer.lora_B]
        result.replaced.append({"target": path, "kind": kind, "shape": (layer.out_features, layer.in_features),
                                "base": type(layer.base_layer).__name__})
    gm.graph.lint()
    gm.recompile()
    result.counters = {"replaced": len(result.replaced), "skipped": len(result.skipped)}
    log.info("%s: %d linears swapped, %d skipped", NAME, len(result.replaced), len(result.skipped))
    return result
