"""Training-mode dropout on a cifar32 activation, forward and forward+backward: ATen's dropout (the
reference: its CPU mask drawn by bernoulli_, element by element on one thread) against the
extension's CPU kernel (Philox, in parallel). CPU only: on CUDA ops.dropout runs ATen's, already a
parallel Philox kernel. GB/s counts reading x and writing y (and the same again backward)."""
import pytest
import torch

from benchmarks import common


@pytest.mark.skipif(common.ON_GPU, reason="the extension's dropout is a CPU kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", common.DROPOUT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_dropout(record, backend, shape, direction, dtype):
    record(*common.bench_dropout(backend, shape, direction, dtype))
