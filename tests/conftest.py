import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter (set before triton loads).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture
def backend(request):
    """The backend an op contract test runs on (tests/backends.py), forced for the whole test:
    parametrize "backend" indirectly with tests.backends.params() or .cases(). Skipped, with the
    reason, where it cannot run."""
    from .backends import BACKENDS, forced, skip_reason
    name = request.param
    reason = skip_reason(name)
    if reason:
        pytest.skip(reason)
    with forced(name):
        yield BACKENDS[name]
