"""Shared test settings: deterministic, single-threaded-friendly torch on a 2-core machine."""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
# The Triton kernels' tests run in Triton's interpreter where there is no GPU. It has to be on
# before triton is first imported (transformers imports it too) and while kernels run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """torch on one thread for the test (tiny models gain nothing from a second one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
