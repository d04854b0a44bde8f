"""``define_op``: a ``memtrain::`` op registered with ``torch.library.Library`` rather than ``custom_op``.

For ops on the host's hot path (the NF4 ops run once per quantised layer in every forward and backward):
``custom_op`` adds a Python wrapper to every call (device lookup, aliasing checks), on CPU 9-14 us a call
on top of the dispatcher's own (a 64x64 NF4 weight: ``nf4_dequant`` 100 against 86 us, ``nf4_linear``
118 against 109 us). What ``custom_op`` gave is kept: the schema, the fake, the autograd formula and the
``pt2_compliant`` tag.
"""
from __future__ import annotations

from typing import Callable

import torch

_LIBRARIES: list[torch.library.Library] = []  # an op stays registered while its library lives


def define_op(schema: str, impl: Callable, fake: Callable, backward: Callable | None = None,
              setup_context: Callable | None = None) -> torch._ops.OpOverload:
    """Define ``memtrain::<schema>`` with ``impl`` for every device, ``fake`` for tracing and, given
    ``backward``, its autograd formula; returns the op (``torch.ops.memtrain.<name>.default``)."""
    name = schema.split("(", 1)[0]
    lib = torch.library.Library("memtrain", "FRAGMENT")
    lib.define(schema, tags=(torch.Tag.pt2_compliant_tag,))
    lib.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"memtrain::{name}", fake, lib=lib)
    if backward is not None:
        torch.library.register_autograd(f"memtrain::{name}", backward, setup_context=setup_context, lib=lib)
    _LIBRARIES.append(lib)
    return getattr(torch.ops.memtrain, name).default
