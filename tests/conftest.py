"""Test set-up shared by every test module.

TRITON_INTERPRET must be set before any `@triton.jit` function is defined, i.e.
before `kernels` modules are imported, so it is set here, at collection time.
On a machine with a GPU, `make test-gpu` unsets it to run the compiled kernels.
"""
import os

if os.environ.get("POWERBERT_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def kernel_device() -> str:
    """Device kernel tests run on: CUDA when POWERBERT_TEST_GPU=1, else CPU (interpreter)."""
    return "cuda" if os.environ.get("POWERBERT_TEST_GPU") == "1" else "cpu"


@pytest.fixture
def device() -> str:
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
