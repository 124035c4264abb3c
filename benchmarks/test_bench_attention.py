"""Attention forward and forward+backward at the anime64 shapes (bf16): SDPA (the reference)
against the Triton flash attention (and the extension's, where it has one)."""
import pytest

from benchmarks import common


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", common.ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", common.backends("attention"))
def test_attention(record, backend, shape, direction):
    record(*common.bench_attention(backend, *shape, direction))
