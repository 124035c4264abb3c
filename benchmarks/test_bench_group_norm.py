"""GroupNorm(32)+SiLU, forward and forward+backward, at the anime64 widths (bf16, channels_last):
torch eager (the reference), torch.compile of it, Triton and the C++/CUDA extension."""
import pytest

from benchmarks import common


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", common.GN_SHAPES, ids=lambda s: f"C{s[0]}_{s[1]}x{s[2]}")
@pytest.mark.parametrize("backend", common.backends("group_norm_act"))
def test_group_norm_silu(record, backend, shape, direction):
    record(*common.bench_group_norm(backend, *shape, direction))
