"""ddpm_fast.heap: glibc's malloc keeps freed memory in its heap, and leaves a user's malloc alone;
the plan decides where (plan.KEEP_HEAP) and the commands act on it."""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from ddpm_fast import heap
from ddpm_fast.plan import ExecutionPlan

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# In a fresh process: keep_freed_memory()'s answer, then whether a 64 MiB block lies in the heap
# ([heap] in /proc/self/maps) and whether its pages stay resident after free (the RSS it added).
PROBE = textwrap.dedent("""
    import ctypes, sys
    from ddpm_fast.heap import keep_freed_memory
    kept = keep_freed_memory() if sys.argv[1] == "keep" else None
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096
    size = 64 << 20
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    heap = [l.split()[0].split("-") for l in open("/proc/self/maps") if l.rstrip().endswith("[heap]")]
    in_heap = any(int(a, 16) <= p < int(b, 16) for a, b in heap)
    before = rss()
    libc.free(p)
    print(kept, in_heap, before - rss() < size // 2)
""")


def probe(mode: str, **env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(heap.__file__)))
    return out.stdout.split()


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc")
def test_a_large_block_comes_from_the_heap_and_stays_resident_when_kept():
    for var in heap.USER_SETTINGS + ("GLIBC_TUNABLES", "LD_PRELOAD"):
        assert var not in os.environ, f"the test's own environment sets malloc ({var})"
    assert probe("keep") == ["True", "True", "True"]
    # malloc's default: a block this large gets its own mapping, unmapped (its pages gone) on free
    assert probe("default") == ["None", "False", "False"]
    # a user's setting is theirs: nothing changes
    assert probe("keep", MALLOC_MMAP_MAX_="65536") == ["False", "False", "False"]


@pytest.mark.parametrize("env, expected", [
    ({}, False), ({"MALLOC_MMAP_MAX_": "0"}, True), ({"MALLOC_TRIM_THRESHOLD_": "1"}, True),
    ({"MALLOC_MMAP_THRESHOLD_": "1"}, True), ({"MALLOC_TOP_PAD_": "1"}, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, True), ({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}, False),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, True), ({"LD_PRELOAD": "libtcmalloc.so"}, True),
    ({"LD_PRELOAD": "/opt/lib/libiomp5.so"}, False), ({"MALLOC_ARENA_MAX": "2"}, False),
])
def test_a_user_who_sets_malloc_keeps_their_setting(env, expected):
    assert heap.user_set_malloc(env) is expected
    assert heap.can_keep_freed_memory(env) is (GLIBC and not expected)


@pytest.mark.parametrize("kind", ["cpu-amd-avx2", "cpu-intel-avx2"])
def test_the_plan_keeps_the_heap_where_measured(monkeypatch, kind):
    """resolve() keeps the heap on a kind of CPU in KEEP_HEAP (glibc, unset by the user), says so in
    its line; a kind not measured, a GPU, a user's malloc setting, and FastSampler's plan do not."""
    from ddpm_fast import plan
    from ddpm_fast.plan import KEEP_HEAP, MEMORY_ELEMENTS, keep_heap_of

    for var in heap.USER_SETTINGS + ("GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(plan, "device_class", lambda device: kind)
    measured = kind in KEEP_HEAP and GLIBC
    assert kind != "cpu-amd-avx2" or kind in KEEP_HEAP
    cpu = torch.device("cpu")
    assert keep_heap_of(cpu) is measured and keep_heap_of(torch.device("cuda", 0)) is False
    for p in (ExecutionPlan.resolve("cpu"), ExecutionPlan.resolve("cpu", fast=True)):
        assert p.keep_heap is measured
        assert ("freed memory kept in the heap" in p.describe()) is measured
        assert not measured or p.eval_elements == MEMORY_ELEMENTS  # the heap kept: memory's cap alone
    assert ExecutionPlan.from_options(cpu).keep_heap is False  # the Python API leaves the process alone
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert ExecutionPlan.resolve("cpu").keep_heap is False


@pytest.mark.parametrize("keep", [True, False])
def test_the_commands_keep_the_heap_when_the_plan_says(monkeypatch, tmp_path, keep):
    """The sampling commands' plan_from_args and the training loop's fit call keep_freed_memory
    (through the plan's apply_to_process) exactly when their plan keeps the heap."""
    from ddpm_fast import plan
    from ddpm_fast.commands import cli
    from ddpm_fast.training import loop
    from ddpm_fast.training.config import TrainConfig
    from ddpm_fast.training.run import build_run

    calls = []
    monkeypatch.setattr(plan, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(plan, "keep_heap_of", lambda device: keep)
    args = argparse.Namespace(device="cpu", fast=False, kernels="auto", compile="none")
    assert cli.plan_from_args(args).keep_heap is keep and len(calls) == keep
    cfg = TrainConfig(preset="tiny", image_size=8, ch_mult=(1, 2), attn_res=(), batch_size=4, steps=1, warmup=0,
                      workers=0, sample_every=10 ** 6, eval_every=0, out=str(tmp_path / "run"))
    run = build_run(cfg)
    monkeypatch.setattr(loop, "train_steps", lambda run, stop: run.out)
    assert run.plan.keep_heap is keep
    loop.fit(run)
    assert len(calls) == 2 * keep


def test_the_heap_benchmark_alternates_the_modes_and_pairs_them(tmp_path, monkeypatch):
    """benchmarks.heap: fresh processes in turn, kept then system; only the kept ones keep the heap
    (where glibc can); the ratio is the pairs' step medians, each a median of the run's steps."""
    import json

    from benchmarks import heap as bench

    monkeypatch.setenv("OUT", str(tmp_path))
    for var in heap.USER_SETTINGS + ("GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(var, raising=False)
    assert bench.main(["--image-size", "8", "--batch-size", "2", "--steps", "3", "--warmup", "0", "--pairs", "2"]) == 0
    result = json.loads((tmp_path / "heap.json").read_text())
    runs = result["runs"]
    assert [r["mode"] for r in runs] == ["kept", "system"] * 2
    assert [r["kept"] for r in runs] == [GLIBC, False] * 2
    ratios = sorted(runs[i]["step_ms"] / runs[i + 1]["step_ms"] for i in (0, 2))
    summary = result["summary"]
    assert summary["kept_over_system"] == {"median": round(sum(ratios) / 2, 3), "min": round(ratios[0], 3),
                                           "max": round(ratios[1], 3), "rounds": 2}
    steps = sorted(r["step_ms"] for r in runs if r["mode"] == "system")
    assert (summary["system"]["step_ms"]["min"], summary["system"]["step_ms"]["max"]) == tuple(steps)
    assert all(r["step_ms"] > 0 and r["minor_faults_per_step"] >= 0 and r["peak_rss_mib"] > 100 for r in runs)


@pytest.mark.parametrize("flag, bf16", [("--fast", True), ("--no-fast", False)])
def test_the_heap_benchmark_runs_the_path_it_is_given(tmp_path, monkeypatch, flag, bf16):
    """--fast and --no-fast reach each fresh process: bf16 autocast on the fast path, fp32 on the reference."""
    import json

    from benchmarks import heap as bench

    monkeypatch.setenv("OUT", str(tmp_path))
    assert bench.main(["--image-size", "8", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--pairs", "1",
                       flag]) == 0
    result = json.loads((tmp_path / "heap.json").read_text())
    assert [r["bf16"] for r in result["runs"]] == [bf16, bf16] and result["env"]["fast"] is bf16
