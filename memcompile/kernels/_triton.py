"""One guard for Triton: kernels import ``triton``/``tl`` from here.

On a CUDA device the Triton kernels run natively. On CPU they run only under ``TRITON_INTERPRET=1``
(tests set it before triton is imported); otherwise the pure-torch reference of each op is used.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # keep the torch references usable without triton
    triton = None
    tl = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(device: torch.device) -> bool:
    """Whether an op on ``device`` launches its Triton kernel (else its torch reference)."""
    if not HAS_TRITON or os.environ.get("MEMTRAIN_DISABLE_TRITON") == "1":
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and INTERPRET and os.environ.get("MEMTRAIN_TRITON_ON_CPU") == "1"


def autotune(gpu: list, interpreter, key: list[str]):
    """``triton.autotune`` over the ``gpu`` configs on a GPU; under the interpreter the one config
    ``interpreter``, where timing configs would time Python. Kernels autotuned this way must be
    idempotent (the tuner runs them several times on the same arguments)."""
    return triton.autotune(configs=[interpreter] if INTERPRET else gpu, key=key)
