"""Regional compilation: one compiled graph for every repeated block of a model.

``torch.compile`` of a whole model traces and compiles every layer; a decoder's layers are the same
code, so compiling one block and reusing its graph for every layer cuts the time to the first step
by about the number of layers. ``compile_blocks`` compiles the children of each ``nn.ModuleList``
of identical blocks with memtrain, and the output head with its loss as one more graph (so the fused
cross-entropy joins the output projection, as in a whole-model compile: the logits are never kept);
the embeddings and the final norm stay eager.

The head's graph is the model's own forward from the decoder's output on: the forward is compiled with
the decoder body (the module whose forward runs the blocks) left to run as it is, a graph break, so
Dynamo resumes after it with the projection and the loss, and the blocks inside run their own graph.

Compression state (VeLoRA's vector, CompAct's step counter and seed) lives on each layer's own
weights (``memcompile.activation_state``), so the shared graph keeps every layer's state apart; a
block's forward tells the state ops its position in its list, from which CompAct draws the block's
seed as a whole-model compile does.

Each compiled module's ``forward`` is replaced by its compiled region's (``_CompiledForward``): one per
list of blocks and one for the head, each with its own graphs and recompile limit, so models compiled one
after another in a process do not share them. A call that passes a KV cache (``generate``) runs the
module's own forward: generation keeps no activations, and the cache's per-layer index would recompile
the block for every layer.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import sys
import weakref
from typing import Any, Callable, Mapping, Sequence

import torch

from memcompile import _torch_compat as tc
from memcompile import activation_state, reporting
from memcompile._warn import warn
from memcompile.config import MemtrainConfig, to_config
from memcompile.marks import mark_grad_approximation

log = logging.getLogger(__name__)


class BlockBackend:
    """The memtrain backend for a graph that serves several modules: one object for all of them, so
    Dynamo's cache (which checks the backend) reuses the first block's graph for the others.
    ``shares``: how many graph runs of a step share ``memory_target`` (every compiled layer, and the head)."""

    def __init__(self, config: MemtrainConfig, served: Mapping[str, torch.nn.Module], region: str = "a repeated block",
                 shares: int = 1, head: tuple[torch.Tensor, str] | None = None):
        self.config, self.served, self.region, self.shares = config, tuple(served), region, shares
        self._modules = [weakref.ref(m) for m in served.values()]
        # The head's backend also gets what the owner's forward runs before (or between) its decoder
        # bodies (a sequence-to-sequence model's shifted labels): a graph that does not read the output
        # projection's weight is labelled so, not as the head.
        self._head = None if head is None else (weakref.ref(head[0]), head[1])

    def _region(self, example_inputs: Sequence[Any]) -> str:
        if self._head is None:
            return self.region
        weight, other = self._head[0](), self._head[1]
        return self.region if weight is None or any(x is weight for x in example_inputs) else other

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs) -> Callable:
        from memcompile import pipeline

        compiled = pipeline.compile_graph(gm, example_inputs, self.config, served=self.served,
                                          region=self._region(example_inputs), shares=self.shares)
        # The compile saw the first block's parameters; every block it serves has the same
        # approximated gradients (Fira reads these marks to refuse them).
        report = reporting.report_of_last_compile()
        for ref in self._modules:
            module = ref()
            for name, method in (report.approximated.items() if module is not None else ()):
                try:
                    mark_grad_approximation(module.get_parameter(name), method)
                except AttributeError:
                    pass  # a graph input that is not one of the block's parameters
        return compiled


class _Forward:
    """A module's forward set in its place as an instance attribute. It holds the forward the module had
    (the class's, bound, or an instance one such as an ``accelerate`` hook's) rather than a closure, so a
    ``copy.deepcopy`` of the model binds the copy's to its own module."""

    def __init__(self, module: torch.nn.Module):
        inner = module.__dict__.get("forward")
        self.inner = inner.inner if isinstance(inner, _Forward) else module.forward  # compile_blocks again

    @property
    def __signature__(self) -> inspect.Signature:
        # The forward's own: Hugging Face and trainers read a forward's parameters to route arguments.
        return inspect.signature(self.inner)


class _EagerForward(_Forward):
    """A forward that Dynamo does not trace (``torch.compiler.disable``): set as the decoder body's
    ``forward``, its call ends the graph of the compiled forward around it."""

    @torch.compiler.disable
    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


# The keywords a Hugging Face layer or model takes its KV cache by (``cache`` since transformers 5.24).
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past", "cache_params")


def _passes_kv_cache(args: tuple, kwargs: dict) -> bool:
    if any(kwargs.get(k) is not None for k in _CACHE_KWARGS):
        return True
    cache_utils = sys.modules.get("transformers.cache_utils")  # no cache class without transformers loaded
    cache = getattr(cache_utils, "Cache", None)
    return cache is not None and any(isinstance(v, cache) for v in (*args, *kwargs.values()))


# Run, not traced, by the enclosing compile: the warning comes at run time. Under fullgraph=True the
# enclosing compile stops here instead, and Dynamo's error gives the reason.
@torch.compiler.disable(reason="a region memcompile.compile_blocks compiled, which an enclosing torch.compile "
                               "does not compile again; its backend and options do not apply to it")
def _compiled_already(region: str) -> None:
    warn(f"memtrain: {region} was compiled by memcompile.compile_blocks, with its options; an enclosing "
         "torch.compile (of the whole model, or a trainer's) does not compile it again, and its backend and "
         "options do not apply to it. To change the options, call memcompile.compile_blocks(model, options=...) "
         "again instead", UserWarning)


class _CompiledForward(_Forward):
    """A compiled region's forward, run as it is when the call passes a KV cache: generation, where each
    layer's cache index and each new length would otherwise recompile the block once per layer, past
    Dynamo's recompile limit (after which even training steps that need a new graph run eager,
    uncompressed), and where there are no activations to save. A deep copy of the model is not
    compiled, as after ``Module.compile``.

    What is compiled is the forward's function, called with the module (Dynamo names the parameters
    from its ``self``, as when it compiles the forward), once for every module of a region
    (``regions``: function -> compiled), so the region's layers share their graphs. A region is
    compiled apart (``_torch_compat.compile_region``): every model of a class runs the same forward code, on which
    Dynamo counts recompiles against its limit (8), so the third model compiled in one process (a
    notebook's rerun, a sweep) trained eager, uncompressed."""

    def __init__(self, module: torch.nn.Module, regions: dict, backend: str | Callable, dynamic: bool | None,
                 region: str, index: int | None = None, eager_decorators: bool = False):
        super().__init__(module)
        self.region, self.index = region, index  # index: a block's position in its list
        self.module = weakref.ref(module)  # the module holds this object
        fn = self.inner.__func__ if inspect.ismethod(self.inner) and self.inner.__self__ is module else None
        self.takes_module = fn is not None
        if fn is None:  # an instance's own forward (a hook's): compiled as it is
            self.compiled = torch.compile(self.inner, backend=backend, dynamic=dynamic)
        else:
            if fn not in regions:
                regions[fn] = tc.compile_region(fn, backend, dynamic, eager_decorators)
            self.compiled = regions[fn]

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # an enclosing torch.compile is tracing the model
            _compiled_already(self.region)
        if _passes_kv_cache(args, kwargs):
            if torch.is_grad_enabled():
                # Once per region and line: the message names the layer class, not the layer.
                warn(f"memtrain: {self.region} (compile_blocks) got a KV cache with gradients on, so it runs "
                     "eager, without memtrain's passes; training needs no cache: pass use_cache=False",
                     UserWarning)
            return self.inner(*args, **kwargs)
        args = (self.module(), *args) if self.takes_module else args
        if self.index is None:
            return self.compiled(*args, **kwargs)
        with activation_state.running_block(self.index):  # for state drawn per block (CompAct's seed)
            return self.compiled(*args, **kwargs)

    def __deepcopy__(self, memo):
        return copy.deepcopy(self.inner, memo)


def repeated_blocks(model: torch.nn.Module) -> dict[str, list[str]]:
    """``{ModuleList path: [child paths]}`` for every ``nn.ModuleList`` of two or more modules of one
    class (a decoder's layers), outermost first; lists inside a block are part of that block."""
    found: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < 2:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if any(name.startswith(outer + ".") for outer in found):
            continue
        found[name] = [f"{name}.{i}" if name else str(i) for i in range(len(module))]
    return found


def _loss_owner(model: torch.nn.Module) -> torch.nn.Module | None:
    """The Hugging Face model whose ``loss_function`` computes the training loss."""
    for module in model.modules():
        if isinstance(getattr(type(module), "loss_function", None), property):
            return module
    return None


def _bodies(owner: torch.nn.Module, blocks: Sequence[str],
            modules: Mapping[str, torch.nn.Module]) -> list[torch.nn.Module] | None:
    """The modules around the repeated blocks that the head's graph leaves out, when every block list
    lies strictly inside ``owner`` (the model with the loss); else ``None``. For each list: the module
    whose forward runs it (its parent), and the owner's child that holds it (a BERT's ``bert``, whose
    embeddings would otherwise join the head's compile). Both, because a model may call the first past
    the second (Bart's causal LM calls its decoder past the wrapper that holds it)."""
    inside = {id(m) for m in owner.modules() if m is not owner}
    found: dict[int, torch.nn.Module] = {}
    for path in blocks:
        parent = modules[path.rpartition(".")[0]]
        if id(parent) not in inside:
            return None
        found[id(parent)] = parent
        for child in owner.children():
            if any(m is parent for m in child.modules()):
                found[id(child)] = child
    return list(found.values())


def compile_blocks(model: torch.nn.Module, options: MemtrainConfig | Mapping[str, Any] | None = None, *,
                   dynamic: bool | None = None, loss: bool = True,
                   backend: str | Callable = "memtrain") -> dict[str, list[str]]:
    """Compile every repeated block of ``model`` with memtrain (one graph, reused for every layer) and,
    with ``loss``, the output head of a Hugging Face model with its loss (a second graph: the
    projection and ``loss_function``, where Dynamo resumes after the decoder body, whose ``forward`` is
    set to run outside Dynamo, so that its own code stays eager). Returns the compiled
    blocks, ``{list: [layers]}``.
    ``backend`` another than ``"memtrain"`` (``"inductor"``) compiles the same regions with it, without
    memtrain's passes, for comparison.

    For training, as Hugging Face's own gradient checkpointing does: the KV cache is turned off
    (``config.use_cache = False`` in every config of the model: its per-layer index would recompile the
    block for every layer),
    and the embeddings' output requires grad (``enable_input_require_grads``), so the first layer's
    input is like every other layer's and needs no graph of its own; that adds the first layer's
    input gradient to the backward.
    """
    if backend != "memtrain" and options is not None:
        raise ValueError(f"compile_blocks: options are memtrain's; backend={backend!r} takes none")
    config = to_config(options)
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError("compile_blocks found no nn.ModuleList of repeated blocks in the model; compile the "
                         "whole model with torch.compile(model, backend='memtrain', options=...) instead")
    # Every config in the model: a sequence-to-sequence model's decoder stack holds its own copy (T5),
    # whose cache would recompile the decoder's block once per layer, past Dynamo's recompile limit.
    caching = {id(c): c for c in (getattr(m, "config", None) for m in model.modules()) if getattr(c, "use_cache", False)}
    if caching:
        log.info("memtrain: compile_blocks sets config.use_cache = False (training needs no KV cache)")
        for hf_config in caching.values():
            hf_config.use_cache = False
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if backend in ("memtrain", "inductor") and config.compiler == "inductor" and any(
            p.is_cuda for p in model.parameters()):
        # Before the first step: the pool warms while the caller loads data and Dynamo traces.
        tc.warm_kernel_build_pool()
    modules = dict(model.named_modules())
    head = _head(model, blocks, modules) if loss else None
    # memory_target is the step's: every layer's run of its block's graph, and the head's graph, plan for
    # an equal share of it (the whole-model compile plans it as one).
    shares = sum(len(layers) for layers in blocks.values()) + (head is not None)

    for layers in blocks.values():
        block_backend = (BlockBackend(config, {name: modules[name] for name in layers}, shares=shares)
                         if backend == "memtrain" else backend)
        regions: dict = {}  # the list's layers share their region's graphs
        for index, name in enumerate(layers):
            module = modules[name]
            module.forward = _CompiledForward(module, regions, block_backend, dynamic, type(module).__name__, index)
    if head is not None:
        _compile_head(*head, config, backend, dynamic, shares)
    return blocks


def _head(model: torch.nn.Module, blocks: Mapping[str, list[str]],
          modules: Mapping[str, torch.nn.Module]) -> tuple[torch.nn.Module, list[torch.nn.Module]] | None:
    """The model that owns the loss and the decoder bodies its head's graph leaves out; ``None`` (and a
    warning: the head and loss stay eager) where there is none."""
    owner = _loss_owner(model)
    if owner is None:
        log.warning("memtrain: compile_blocks found no Hugging Face loss_function; the head and loss stay eager")
        return None
    bodies = _bodies(owner, blocks, modules)
    if bodies is None:
        log.warning("memtrain: compile_blocks found repeated blocks outside %s's submodules, so it cannot compile the "
                    "head apart from them; the output projection and the loss stay eager", type(owner).__name__)
        return None
    return owner, bodies


def _compile_head(owner: torch.nn.Module, bodies: Sequence[torch.nn.Module], config: MemtrainConfig,
                  backend: str | Callable, dynamic: bool | None, shares: int) -> None:
    """Compile the forward of the model that owns the loss, less its decoder bodies: the output
    projection and the loss in one graph."""
    # The head's inputs are the final hidden states and the labels: a recompute budget there could only
    # rerun the head itself, so it is compiled without one (the blocks keep theirs). memory_target, which
    # the planner meets by choosing per tensor, plans the head for its share like a layer.
    name = type(owner).__name__
    region = f"the output head and its loss: {name}'s forward outside its decoder body (compile_blocks)"
    outside = f"{name}'s forward outside its decoder bodies, not the output head (compile_blocks)"
    projection = owner.get_output_embeddings() if hasattr(owner, "get_output_embeddings") else None
    weight = getattr(projection, "weight", None)
    head_backend = (BlockBackend(dataclasses.replace(config, recompute_budget=None), {}, region, shares,
                                 None if not isinstance(weight, torch.Tensor) else (weight, outside))
                    if backend == "memtrain" else backend)
    # Disabled, a body's call is a graph break in the owner's forward: Dynamo compiles what follows it
    # (projection and loss) as one graph, and the blocks inside the body run their own compiled graph.
    for body in bodies:
        body.forward = _EagerForward(body)
    # Its decorators (transformers' kwarg and return-type wrappers) run eagerly around the compiled forward:
    # the break at the decoder body would otherwise make Dynamo trace and restart each of them.
    owner.forward = _CompiledForward(owner, {}, head_backend, dynamic, f"{name}'s output head", eager_decorators=True)
