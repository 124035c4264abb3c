"""The reverse-step update on a 256-image anime64 batch: the eager chain (the reference, with
torch.randn noise) against Triton and the extension (in-kernel Philox noise). GB/s counts the
minimal traffic (read x and model_out, write out and x0); the report sets it against the copy ceiling."""
import pytest
import torch

from benchmarks import common


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", common.SAMPLING_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", common.backends("sampling_update"))
def test_sampling_update(record, backend, shape, dtype):
    record(*common.bench_sampling_update(backend, shape, dtype))
