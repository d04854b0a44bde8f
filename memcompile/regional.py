"""Regional compilation: one compiled graph for every repeated block of a model.

``torch.compile`` of a whole model traces and compiles every layer; a decoder's layers are the same
code, so compiling one block and reusing its graph for every layer cuts the time to the first step
by about the number of layers. ``compile_blocks`` compiles the children of each ``nn.ModuleList``
of identical blocks with memtrain, and the model's loss function (so the fused cross-entropy still
applies to it); the embeddings, final norm and output projection stay eager.

Compression state (VeLoRA's vector, CompAct's step counter and seed) lives on each layer's own
weights (``memcompile.activation_state``), so the shared graph keeps every layer's state apart.
"""
from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any, Callable, Mapping, Sequence

import torch

from memcompile import reporting
from memcompile.config import MemtrainConfig, to_config
from memcompile.marks import mark_grad_approximation

log = logging.getLogger(__name__)


class BlockBackend:
    """The memtrain backend for a graph that serves several modules: one object for all of them, so
    Dynamo's cache (which checks the backend) reuses the first block's graph for the others."""

    def __init__(self, config: MemtrainConfig, served: Mapping[str, torch.nn.Module]):
        self.config, self.served = config, tuple(served)
        self._modules = [weakref.ref(m) for m in served.values()]

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs) -> Callable:
        from memcompile import pipeline

        compiled = pipeline.compile_graph(gm, example_inputs, self.config, served=self.served, region=True)
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


def compile_blocks(model: torch.nn.Module, options: MemtrainConfig | Mapping[str, Any] | None = None, *,
                   dynamic: bool | None = None, loss: bool = True,
                   backend: str | Callable = "memtrain") -> dict[str, list[str]]:
    """Compile every repeated block of ``model`` with memtrain (one graph, reused for every layer) and,
    with ``loss``, its Hugging Face loss function. Returns the compiled blocks, ``{list: [layers]}``.
    ``backend`` another than ``"memtrain"`` (``"inductor"``) compiles the same regions with it, without
    memtrain's passes, for comparison.

    For training, as Hugging Face's own gradient checkpointing does: the KV cache is turned off
    (``config.use_cache = False``: its per-layer index would recompile the block for every layer),
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
    hf_config = getattr(model, "config", None)
    if getattr(hf_config, "use_cache", False):
        log.info("memtrain: compile_blocks sets config.use_cache = False (training needs no KV cache)")
        hf_config.use_cache = False
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if backend in ("memtrain", "inductor") and config.compiler == "inductor" and any(
            p.is_cuda for p in model.parameters()):
        # Before the first step: the pool warms while the caller loads data and Dynamo traces.
        from memcompile import _torch_compat as tc

        tc.warm_kernel_build_pool()
    modules = dict(model.named_modules())

    def backend_for(served):
        return BlockBackend(config, served) if backend == "memtrain" else backend

    for layers in blocks.values():
        block_backend = backend_for({name: modules[name] for name in layers})
        for name in layers:
            modules[name].compile(backend=block_backend, dynamic=dynamic)
    if loss:
        owner = _loss_owner(model)
        if owner is None:
            log.warning("memtrain: compile_blocks found no Hugging Face loss_function; the loss stays eager")
        else:
            # The loss graph's inputs are the logits and labels: a recompute budget there could only
            # rerun the loss itself, so it is compiled without one (the blocks keep theirs); the blocks
            # share memory_target among their layers, and the loss graph is not planned.
            loss_backend = (BlockBackend(dataclasses.replace(config, recompute_budget=None, memory_target=None), {})
                            if backend == "memtrain" else backend)
            owner.loss_function = torch.compile(owner.loss_function, backend=loss_backend, dynamic=dynamic)
    return blocks
