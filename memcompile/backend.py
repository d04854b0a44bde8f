"""The ``memtrain`` torch.compile backend (``torch.compile(model, backend="memtrain", options=...)``).

Registered through the ``torch_dynamo_backends`` entry point, so it works without importing
memcompile first. A plain function rather than an ``aot_autograd`` object, because Dynamo hands
``options`` to the backend as a keyword that ``aot_autograd`` objects would silently drop.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from memcompile.config import MemtrainConfig, to_config


def memtrain(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
             options: MemtrainConfig | Mapping[str, Any] | None = None, **kwargs) -> Callable:
    """Compile one Dynamo graph with memtrain's passes (see ``memcompile.pipeline``)."""
    try:
        if kwargs.get("mode") is not None:
            raise ValueError(f"backend='memtrain' takes options=..., not mode={kwargs['mode']!r}; "
                             "see memcompile.MemtrainConfig for the options")
        unknown = sorted(k for k in kwargs if k != "mode")
        if unknown:
            raise ValueError(f"backend='memtrain' got unexpected arguments {unknown}; pass options=... instead")
        config = to_config(options)
    except ValueError as e:
        # Dynamo calls a backend only at the first compile and wraps what it raises in its own
        # BackendCompilerFailed; a bad option must read as ours (and stay a ValueError).
        # (``torch.compile`` keeps ``options`` to itself until then: pass a ``MemtrainConfig`` to
        # have them checked where they are written.)
        from memcompile import _torch_compat as tc

        raise tc.option_error(str(e)) from None
    from memcompile import pipeline  # keeps `import memcompile` light for the entry point

    return pipeline.compile_graph(gm, example_inputs, config)
