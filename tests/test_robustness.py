"""Defects users met outside the well-trodden path: gradient checkpointing, autocast, bf16 under
Inductor, layer classes other than nn.Linear, options that silently did nothing, wrapped errors."""
import logging
import warnings

import pytest
import torch

import memcompile
from tests import models


def test_bad_option_is_raised_as_our_own_value_error():
    """Dynamo wraps what a backend raises in BackendCompilerFailed; a bad option reads as memtrain's."""
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="memtrain", options={"activation": "velroa"})
    with pytest.raises(ValueError) as info:
        compiled(torch.randn(2, 4))
    assert str(info.value).startswith("memtrain option 'activation': got 'velroa'; valid:")
    assert "BackendCompilerFailed" not in type(info.value).__name__
