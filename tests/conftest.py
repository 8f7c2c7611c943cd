"""Test-wide set-up: device discovery and the Triton interpreter on machines without CUDA.

TRITON_INTERPRET is read when a module defining @triton.jit kernels is imported, so it is set
here, before any project import; OPENBLAS_NUM_THREADS=1 keeps the interpreter fast and stable.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every available device: 'cpu' always, 'cuda' where present."""
    return request.param


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    """Modules that train tiny models set 1 torch thread; give the next module its default back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
