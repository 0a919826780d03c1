"""Shared test settings: deterministic, single-threaded-friendly torch on a 2-core machine."""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
