"""Test setup. Without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET must be
set before any kernel module is imported, so it is set here, first."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
