"""What a quantised base is to the rest of memcompile, and the registry of the formats.

Two halves, as a quantised layer has two lives:

* ``QuantizedLinear``, the frozen layer in the model: ``prepare`` puts it under a ``LoRALinear``,
  ``quantized_layers`` reports it, ``merge_lora`` dequantises it;
* ``QuantScheme``, the format: turns a dense (or another library's already quantised) linear into such
  a layer, and reads the layer's op back from a compiled graph for the report.

A scheme registers under the name ``lora.quant`` selects (``@register``). A new base (int8, FP8, HQQ)
is one folder beside ``nf4/``: its format, its ops, its layer and its scheme, named in ``_BUILTIN``.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any, NamedTuple, Protocol, Sequence

import torch
import torch.nn as nn


class QuantOptions(Protocol):
    """The quantisation options a scheme reads (``memcompile.config.LoRAConfig`` has them); named here
    so this module does not import the config, which lists the schemes."""

    blocksize: int
    double_quant: bool


class QuantizedLinear(nn.Module):
    """A frozen ``y = x W^T + b`` whose ``W`` is stored quantised. Subclasses set ``in_features``,
    ``out_features``, ``weight_dtype`` (the dtype before quantisation) and ``bias`` (dense, frozen, or
    ``None``), and implement the three members below."""

    in_features: int
    out_features: int
    weight_dtype: torch.dtype
    bias: nn.Parameter | None

    # nn.Module's metaclass is not ABCMeta, so these raise rather than being declared abstract.
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight (``[out, in]``), in ``dtype`` or the dtype it had before quantisation."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of the quantised weight and its state (the bias not included)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The format's own entries of ``memcompile.quantized_layers``: at least ``"format"``."""
        raise NotImplementedError


class QuantCall(NamedTuple):
    """A quantised linear's op call in a graph, as the compile report reads it."""

    x: Any  # the input node
    tensors: tuple  # the weight's stored tensors (nodes); the first names the layer
    shape: Sequence[int]  # [out_features, in_features]


class QuantScheme(ABC):
    """One storage format for frozen linear weights."""

    name: str  # the value of ``lora.quant`` that selects it
    layer: type[QuantizedLinear]  # the class of the layers it builds

    @abstractmethod
    def quantize(self, weight: torch.Tensor, cfg: QuantOptions) -> Any:
        """The format's state of a dense 2-D ``weight`` under ``cfg``'s options."""

    @abstractmethod
    def dequantize(self, state: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight of ``state``, in ``dtype`` or the dtype it had before quantisation."""

    @abstractmethod
    def from_linear(self, linear: nn.Linear, cfg: QuantOptions) -> QuantizedLinear:
        """The frozen quantised layer computing what ``linear`` computes, up to the format's error."""

    def adopt(self, module: nn.Module) -> QuantizedLinear | None:
        """``module`` as this format's layer when another library already quantised it in this format
        (its codes taken over unchanged), else ``None``."""
        return None

    @property
    @abstractmethod
    def op(self) -> Any:
        """The op the layer's forward calls, as a graph node's target (``torch.ops.memtrain.<op>.default``)."""

    @abstractmethod
    def call(self, args: Sequence) -> QuantCall:
        """What the report needs from the positional ``args`` of a call of ``op``."""


_SCHEMES: dict[str, QuantScheme] = {}
# The built-in schemes' modules, imported on first use (each registers itself there): they register
# their ops and load Triton, which ``import memcompile`` should not.
_BUILTIN = {"nf4": "memcompile.quant.nf4"}


def _load(names=None) -> None:
    for name in _BUILTIN if names is None else names:
        if name in _BUILTIN and name not in _SCHEMES:
            importlib.import_module(_BUILTIN[name])


def register(cls: type[QuantScheme]) -> type[QuantScheme]:
    """Class decorator: make ``cls`` the scheme ``lora.quant=cls.name`` selects."""
    if cls.name in _SCHEMES or cls.name == "none":
        raise ValueError(f"quantisation scheme {cls.name!r} is already taken")
    _SCHEMES[cls.name] = cls()
    return cls


def get(name: str) -> QuantScheme:
    _load([name])
    try:
        return _SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown quantisation scheme {name!r}; valid: {names()}") from None


def names() -> tuple[str, ...]:
    return tuple(dict.fromkeys([*_BUILTIN, *_SCHEMES]))


def schemes() -> tuple[QuantScheme, ...]:
    _load()
    return tuple(_SCHEMES.values())


def for_op(target) -> QuantScheme | None:
    """The scheme whose layers call ``target`` (a graph node's target), or ``None``."""
    _load()
    return next((s for s in _SCHEMES.values() if s.op is target), None)
