"""Test configuration.

Without a CUDA GPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1) on CPU
tensors. It must be set before any @triton.jit decorator runs, so it is set here, before fastsynth
(and through it the Triton kernels) is imported. With a GPU it is left unset: the interpreter reads
the device addresses the kernels receive (work tables, pointers) from host memory, which crashes or
returns garbage, so GPU runs use the compiled Triton path. An explicit TRITON_INTERPRET in the
environment is always respected. Tests of the CUDA backend carry the ``needs_cuda`` marker and are
skipped without a GPU.
"""
import os

import torch  # importing torch does not decorate any Triton kernel; fastsynth does

GPU_PRESENT = torch.cuda.is_available()
if not GPU_PRESENT:
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

import pytest  # noqa: E402

import fastsynth  # noqa: E402
from fastsynth import _ext  # noqa: E402

HAS_CUDA = GPU_PRESENT and _ext.has_cuda_extension()
# the message fastsynth.backend raises for backend="triton" on CPU tensors without the interpreter
_NO_INTERPRETER = "on CPU tensors needs TRITON_INTERPRET=1"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """On a GPU machine (compiled Triton) the CPU-tensor runs of the Triton backend cannot run:
    report them as skipped, not failed. Nothing changes where the interpreter is on."""
    try:
        return (yield)
    except Exception as e:  # the ValueError may arrive wrapped (torch.compile, opcheck)
        if not TRITON_INTERPRETED and _raised_for_missing_interpreter(e):
            pytest.skip("Triton backend on CPU tensors: the interpreter is off (a CUDA GPU is present)")
        raise


def _raised_for_missing_interpreter(e):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if _NO_INTERPRETER in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU and fastsynth._C built with CUDA")
    for item in items:
        if "needs_cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (tiny networks: one thread is fastest, and immune to a busy
    machine; results do not depend on the thread count). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
