"""Test setup. Without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET must be
set before any kernel module is imported, so it is set here, first."""
import os

# Before CUDA starts: the poisoned-memory fixtures turn deterministic algorithms on, and cuBLAS
# then needs a fixed workspace (else a matmul raises on some torch versions).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def pytest_collection_modifyitems(items):
    """Every test that needs CUDA is a `gpu` test too, so `pytest -m gpu` (the GPU suite's tests
    step) runs all of them and the kernel files (marked `gpu` as a whole) and nothing CPU-only."""
    for item in items:
        if any(m.kwargs.get("reason") == "needs CUDA" for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.gpu)


class NoHostSync:
    """Context manager: fail on any read of a tensor's value by the host (.item(), indexing by a
    0-dim tensor, bool(t), ...), which a CUDA-graph capture forbids. On the CPU this checks the
    code that CUDA graphs capture, without a GPU."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    raise AssertionError("a host read of a tensor value (a sync) in code meant for capture")
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        return self.mode.__enter__()

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@pytest.fixture
def poisoned():
    """Every empty allocation NaN-filled (deterministic mode), so that an output element a kernel
    forgets to write fails the comparison."""
    was_det, was_fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.empty(4).isnan().all()  # the poison is really there
    yield
    torch.use_deterministic_algorithms(was_det)
    torch.utils.deterministic.fill_uninitialized_memory = was_fill


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
