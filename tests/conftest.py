"""Test configuration.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is set here, before
fastsynth (and through it the Triton kernels) is imported: the Triton backend then runs on CPU
tensors. Tests of the CUDA backend carry the ``needs_cuda`` marker and are skipped without a GPU.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastsynth  # noqa: E402
from fastsynth import _ext  # noqa: E402

HAS_CUDA = torch.cuda.is_available() and _ext.has_cuda_extension()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU and fastsynth._C built with CUDA")
    for item in items:
        if "needs_cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
