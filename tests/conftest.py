import os

import torch  # imports no triton

# Triton reads this when it is imported: set it before anything imports triton. Without CUDA the kernels
# run in the interpreter; with CUDA natively, or the GPU tests would time the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One Inductor cache per run keeps repeated tiny compiles fast on CI's two cores.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "inductor"))

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_state():
    """Each test starts with no compiled graphs, reports or activation state from another."""
    import memcompile

    torch.compiler.reset()
    memcompile.clear_reports()
    memcompile.activation_state.reset()
    yield
