"""Test set-up shared by every test module.

Two runs use this suite:

* the CPU run (default, ``make test``): ``TRITON_INTERPRET=1`` is set here, at collection time,
  before any ``@triton.jit`` function is defined (i.e. before ``kernels`` is imported), and the
  kernel tests run the Triton kernels on CPU tensors;
* the GPU run (``POWERBERT_TEST_GPU=1``, ``benchmarks/gpu.sh tests``): the interpreter stays off,
  the ``device`` fixture gives ``"cuda"`` and the same kernel tests run the compiled kernels.

Markers say which run a test belongs to, and a test outside its run skips with the reason:

* ``gpu``: needs CUDA tensors (skips on a machine without CUDA);
* ``interpreter``: runs Triton on CPU tensors, which only the interpreter can do (skips in the
  GPU run, where the tests taking the ``device`` fixture cover the compiled kernels).

The ``device`` fixture skips too when the GPU run is asked for on a machine without CUDA, so
``POWERBERT_TEST_GPU=1`` on a CPU machine runs exactly the tests that need neither (what
``gpu.sh --dry-run tests`` checks).
"""
import os

GPU_RUN = os.environ.get("POWERBERT_TEST_GPU") == "1"
if not GPU_RUN:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

NEEDS_CUDA = "needs CUDA tensors: no CUDA device on this machine"
NEEDS_INTERPRETER = ("interpreter-only: runs the Triton kernels on CPU tensors, which needs "
                     "TRITON_INTERPRET=1 (the CPU run); the GPU run covers them through the device fixture")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def kernel_device() -> str:
    """Device kernel tests run on: CUDA when POWERBERT_TEST_GPU=1, else CPU (interpreter)."""
    return "cuda" if GPU_RUN else "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreter: runs Triton kernels on CPU tensors, needs TRITON_INTERPRET=1 "
                                       "(skipped in the GPU run)")


def pytest_runtest_setup(item):
    # torch.cuda is asked only here, when a marked test is about to run: never at import or
    # collection time, so CPU-only machines collect everything.
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip(NEEDS_CUDA)
    if item.get_closest_marker("interpreter") is not None and not interpreting():
        pytest.skip(NEEDS_INTERPRETER)


@pytest.fixture
def device() -> str:
    if GPU_RUN and not torch.cuda.is_available():
        pytest.skip(f"POWERBERT_TEST_GPU=1 {NEEDS_CUDA}")
    return kernel_device()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run ~10x faster on one thread than on two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
