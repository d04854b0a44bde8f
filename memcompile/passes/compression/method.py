"""What a compression method of the activation-compression pass is, and the registry of them.

A method lives in one file of this folder (``velora.py``, ``compact.py``), which builds one
``CompressionMethod`` and hands it to ``register``; the folder's ``__init__`` imports every file in
it. The method's name is then a value of ``MemtrainConfig.activation`` and the name of the
config section that holds its options dataclass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

# Never compressed unless a method says otherwise: the output projection, LoRA B (its input is the
# rank-r LoRA A output, already small) and the embeddings (no matmul input to save).
DEFAULT_EXCLUDE = ("lm_head", "lora_B", "embed_tokens", "wte")


@dataclass(frozen=True)
class Group:
    """Layers that read one input: what a method compresses once for all of them."""

    key: str  # the first layer's name (its module path)
    tokens: int  # N of the (N, D) input; the example size when symbolic
    width: int  # D
    dtype: torch.dtype
    device: torch.device
    in_block: bool  # the graph is one block that serves several layers, its names relative to the block


@dataclass(frozen=True)
class Compression:
    """The code a method inserts for one group, traced into the joint graph.

    ``project(x, owner) -> (z, state)`` runs in the forward: ``z`` (``N x width``) is saved instead of
    ``x`` and ``state`` (the method's vector or seed, read from the layer's ``owner`` weight) with it.
    In the backward, ``weight_grad(g^T, z, state)`` gives ``(O, D)`` for an ``nn.Linear`` and
    ``weight_grad_conv1d(g, z, state)`` gives ``(D, O)`` for GPT-2's ``Conv1D``.
    """

    project: Callable
    weight_grad: Callable
    weight_grad_conv1d: Callable
    width: int  # columns of z
    state_bytes: int  # what else the forward keeps per group


@dataclass(frozen=True)
class CompressionMethod:
    """One method.

    Args:
        name: the ``activation`` value that selects it and the name of its config section.
        config: its options dataclass (frozen, validated in ``__post_init__``).
        targets, exclude: default module-name patterns of the layers it compresses and leaves alone.
        check: ``(its options, input width) -> reason or None``: why a layer is left exact.
        plan: ``(its options, Group) -> Compression``.
        state_op: the op ``project`` calls to read or advance the layer's state; the pass keeps its
            node from being recomputed (recomputing would count a step twice or re-estimate).
        skip_warning: ``(its options, layers check skipped) -> warning or None``, for options that
            would make it compress nothing without a word.
        cli: ``(flag, field)`` pairs: ``python -m memcompile.inspect --{name}-{flag}`` sets ``field``.
        module: the file that defines it (its source is part of the pass's cache key).
    """

    name: str
    config: type
    targets: tuple[str, ...]
    exclude: tuple[str, ...]
    check: Callable[[Any, int], str | None]
    plan: Callable[[Any, Group], Compression]
    state_op: Any
    skip_warning: Callable[[Any, list[str]], str | None] | None = None
    cli: tuple[tuple[str, str], ...] = ()
    module: str = ""


METHODS: dict[str, CompressionMethod] = {}


def register(method: CompressionMethod) -> CompressionMethod:
    if method.name in METHODS or method.name == "none":
        raise ValueError(f"compression method {method.name!r} is registered twice (or is 'none')")
    METHODS[method.name] = method
    return method
