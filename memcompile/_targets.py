"""What a target pattern matches: one rule for ``targets``, ``exclude`` and ``lora.targets``.

A pattern matches a dotted module (or parameter) path when it matches

* the whole path, by ``fnmatch`` (``"model.layers.3.*"``, ``"*"``);
* a dotted suffix of it, by ``fnmatch``, as PEFT's ``target_modules`` (``"q_proj"`` and
  ``"self_attn.q_proj"`` match ``model.layers.0.self_attn.q_proj``);
* whole dotted components anywhere in it, literally (``"lora_A"`` matches
  ``...q_proj.lora_A.default``; ``"self_attn"`` and ``"layers.0"`` match ``model.layers.0.self_attn.q_proj``).

``*`` also matches dots. A pattern naming a container (``"self_attn"``) therefore matches every
module inside it: ``memcompile.prepare`` adapts the linears among them, and the activation
compression pass compresses the inputs of the trainable linears among them.
"""
from __future__ import annotations

import fnmatch
from typing import Iterable


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether the dotted path ``name`` matches any of ``patterns`` (see the module's docstring)."""
    padded = f".{name}."
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) or f".{p}." in padded
               for p in patterns)
