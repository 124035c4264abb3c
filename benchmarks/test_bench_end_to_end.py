"""pytest-benchmark cases for a training step and a DDPM sampling step, reference and fast path
(benchmarks.profile_step's step builders). On a GPU: anime64, batch 128 (sampling: 256 images);
with DDPM_BENCH_CPU=1: the tiny model at 16x16, batch 8, without torch.compile. Per-step medians
that pytest-benchmark compares across runs (--benchmark-save / --benchmark-compare); whole epochs
and chains, with loading and CUDA graphs, are benchmarks.epoch and .sample. Not in the backend table."""
import argparse

import pytest

from benchmarks import common, profile_step


def step_args() -> argparse.Namespace:
    if common.ON_GPU:
        return argparse.Namespace(preset="anime64", image_size=64, batch_size=128, sample_n=256,
                                  compile="default", sample_compile=False, kernels="auto")
    return argparse.Namespace(preset="tiny", image_size=16, batch_size=common.batch_size(), sample_n=common.batch_size(),
                              compile="none", sample_compile=False, kernels="auto")


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize("workload", ["train", "sample"])
def test_step(benchmark, workload, path):
    args = step_args()
    make = {"train": profile_step.train_workload, "sample": profile_step.sample_workload}[workload]
    fn = make(path, args, common.DEVICE).step
    benchmark.group = f"{workload} step, {args.preset}, batch {args.batch_size if workload == 'train' else args.sample_n}"
    benchmark.extra_info.update(path=path, device=str(common.DEVICE))
    benchmark.pedantic(common.synced(fn), rounds=10, warmup_rounds=3)  # warm-up: compile, cuDNN plans, allocator
