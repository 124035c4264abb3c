"""python -m benchmarks.profile_step: where the time of a training step and of a sampling step goes.

torch.profiler over `--steps` steps after `--warmup` (compile and cuDNN plans stay out), for the
training step and a sampling step (model + update, no grad) of the reference path (fp32 eager)
and the fast path (bf16, channels_last, torch.compile): the top kernels by device time (on the
CPU: ops by self CPU time) with their share, a share per category (CATEGORIES), and how busy the
device was (kernel time / wall time). Each workload also counts the GFLOP of its matrix products
and convolutions (step_gflop) and times its steps again outside the profiler, whose per-op records
slow a CPU step, giving the rate the step reaches; with `--floor` it measures the device's bf16
matmul ceiling (benchmarks.ceilings) and sets each step against the time that ceiling allows.

The fast path is profiled without its CUDA graphs: the graphs remove launch gaps, not kernel time,
and outside a graph every kernel is attributed to its op. The gap they close shows here as
`busy` < 1; benchmarks.epoch and benchmarks.sample measure the graphed paths. This is the evidence
benchmarks/NOTES.md asks for before and after each optimisation. JSON to $OUT/profile.json when
OUT is set, else benchmarks/results/."""
from __future__ import annotations

import argparse
import re
import tempfile
from typing import Callable, NamedTuple

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from ddpm_fast import FastSampler, GaussianDiffusion, UNet
from ddpm_fast.argtypes import comma_choices, non_negative_int, positive_int
from ddpm_fast.model import preset_config
from ddpm_fast.plan import KERNELS, ExecutionPlan
from ddpm_fast.training.config import TrainConfig
from ddpm_fast.training.run import build_run

from . import ceilings, report_parts
from .common import DEVICE, allow_tf32, bench_env, timed, write_result

# First match wins: attention before matmul (flash kernels are GEMMs too), normalisation before
# elementwise (Inductor names fused GroupNorm kernels triton_*_native_group_norm_*).
CATEGORIES = [
    ("attention", r"flash|fmha|attention|attn|sdpa|softmax"),
    ("optimizer/EMA", r"adam|multi_tensor|foreach|lerp"),
    ("normalisation", r"group_norm|groupnorm|layer_norm|batch_norm|welford|\bgn_|norm_act"),
    ("matmul/conv", r"gemm|conv|cutlass|xmma|cudnn|wgrad|dgrad|fprop|hmma|gmma|mm\b|addmm|bmm|matmul|winograd|mkldnn"),
    ("copies", r"copy|memcpy|memset|cat\b|clone|contiguous|to_copy|fill"),
    ("elementwise", r"triton_|elementwise|vectorized|unrolled|reduce|silu|add|mul|sub|div|exp|sin|cos|where|sum|mean"),
]


def category(name: str) -> str:
    low = name.lower()
    return next((c for c, pat in CATEGORIES if re.search(pat, low)), "other")


# torch.library.register_autograd runs a custom op inside an autograd.Function named
# GeneratedBackwardFor_<namespace>_<op>_<overload>, which calls the kernel below the dispatcher's
# record of the op: on the CPU the kernel's time is that Function's self time, and the op's own row
# holds only the dispatch. The Function's backward node ("...Backward") is the Python that calls
# the backward op, whose kernel has a row of its own.
_AUTOGRAD_WRAPPER = re.compile(r"GeneratedBackwardFor_ddpm_fast_(?P<op>\w+)_default(?P<node>Backward)?")


def op_label(name: str) -> str:
    """The row a profiler event's self time belongs to: a custom op's autograd wrapper is the op."""
    m = _AUTOGRAD_WRAPPER.fullmatch(name)
    if m is None:
        return name
    op = f"ddpm_fast::{m['op']}"
    return f"{op}: autograd node" if m["node"] else op


def profile_steps(fn: Callable[[], object], steps: int, device: torch.device, top: int) -> dict:
    """Profile `steps` calls of fn: the top kernels (ops on CPU) per step, categories, busy share."""
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        _, wall = timed(lambda: [fn() for _ in range(steps)])
    merged: dict[str, list[float]] = {}  # label -> [self us, calls]
    for e in prof.key_averages():
        if on_gpu:  # kernels and copies: the device-side events, less record_function ranges drawn there
            device_side = e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation
            us = e.self_device_time_total if device_side else 0
        else:  # ops' own time; a parent's total would count its children twice
            us = e.self_cpu_time_total
        if us > 0:
            row = merged.setdefault(op_label(e.key), [0.0, 0])
            row[0] += us
            row[1] = max(row[1], e.count)  # a wrapper and its op count the same calls
    rows = [(name, us, n) for name, (us, n) in merged.items()]
    total_us = sum(us for _, us, _ in rows)
    if total_us <= 0:
        raise RuntimeError("the profiler recorded no kernel time")
    rows.sort(key=lambda r: -r[1])
    cats: dict[str, float] = {}
    for name, us, _ in rows:
        cats[category(name)] = cats.get(category(name), 0.0) + us / total_us
    return {
        "steps": steps,
        "wall_ms_per_step": round(1e3 * wall / steps, 3),
        "kernel_ms_per_step": round(total_us / 1e3 / steps, 3),
        # device time / wall time: below 1 the device waited on the host (launches, syncs)
        "busy": round(total_us / 1e6 / wall, 3),
        "kernels_per_step": round(sum(n for _, _, n in rows) / steps, 1),
        "top": [{"name": name[:160], "ms_per_step": round(us / 1e3 / steps, 4), "share": round(us / total_us, 4),
                 "calls_per_step": round(n / steps, 2), "category": category(name)} for name, us, n in rows[:top]],
        "categories": {c: round(s, 4) for c, s in sorted(cats.items(), key=lambda kv: -kv[1])},
    }


class Workload(NamedTuple):
    step: Callable[[], object]  # one step
    model_config: dict  # UNet(**model_config) is the network the step runs
    batch: int
    train: bool


def step_gflop(w: Workload, image_size: int) -> float:
    """GFLOP of the matrix products and convolutions of one step of `w` (forward; when training,
    backward to the weights and activations, not to the images), by torch.utils.flop_counter on
    the meta device: nothing runs, so counting costs the measured device nothing. The reference
    ops count the same as the fused ones, which do no products; the elementwise rest is left out."""
    with torch.device("meta"):
        net = UNet(**w.model_config).set_backend("torch")
        x = torch.randn(w.batch, net.conv_in.in_channels, image_size, image_size)
        t = torch.randint(0, 1000, (w.batch,))
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(w.train):
        out = net(x, t)
        if w.train:
            out.float().square().mean().backward()
    return counter.get_total_flops() / 1e9


def train_workload(path: str, args, device: torch.device) -> Workload:
    """One training step of `path` on a fixed random batch (data loading is not profiled): the
    trainer's own step (build_run), on the plan of the path without CUDA graphs."""
    fast = path == "fast"
    kernels = args.kernels if fast else "torch"
    cfg = TrainConfig(preset=args.preset, image_size=args.image_size, batch_size=args.batch_size, lr=2e-4, warmup=0,
                      steps=10**6, fast=fast, kernels=kernels, compile=args.compile, out=tempfile.mkdtemp())
    plan = ExecutionPlan.resolve(device, fast=fast, kernels=kernels, compile=args.compile, cuda_graphs=False)
    run = build_run(cfg, plan=plan)
    x0 = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1
    counter = iter(range(run.total))
    return Workload(lambda: run.step_fn(next(counter), x0), dict(cfg.model), args.batch_size, train=True)


def sample_workload(path: str, args, device: torch.device) -> Workload:
    """One DDPM sampling step of `path` (model forward + update) on a batch of `--sample-n`, on the
    plan of the path without CUDA graphs."""
    torch.manual_seed(0)
    fast = path == "fast"
    plan = ExecutionPlan.resolve(device, fast=fast, kernels=args.kernels if fast else "torch",
                                 compile="default" if args.sample_compile else None, cuda_graphs=False)
    config = preset_config(args.preset, image_size=args.image_size)
    model = plan.prepare(UNet(**config).eval())
    sampler = FastSampler(model, GaussianDiffusion("linear", 1000), method="ddpm", plan=plan)
    x = torch.randn(args.sample_n, 3, args.image_size, args.image_size, device=device)
    # one step: t = 0
    return Workload(lambda: sampler.sample(args.sample_n, args.image_size, x_start=x, start_t=0), config,
                    args.sample_n, train=False)


def rates(w: Workload, args, row: dict, ceiling: dict | None) -> dict:
    """The step timed outside the profiler, its GFLOP and the rate they make; the matmul/conv
    category's own rate (its profiled ms); with a ceiling, the time the ceiling allows (floor) and
    how many of it the step takes."""
    _, s = timed(lambda: [w.step() for _ in range(args.steps)])
    ms = 1e3 * s / args.steps
    gflop = step_gflop(w, args.image_size)
    conv_ms = row["kernel_ms_per_step"] * row["categories"].get("matmul/conv", 0.0)
    out = {"ms_per_step": ms, "gflop_per_step": gflop, "TFLOPs": gflop / ms,
           "matmul_conv_TFLOPs": gflop / conv_ms if conv_ms > 0 else None}
    if ceiling:
        floor_ms = gflop / ceilings.matmul_rate(ceiling)[1]  # GFLOP / (TFLOP/s) = ms
        out |= {"floor_ms_per_step": floor_ms, "x_floor": ms / floor_ms}
    return {k: v if v is None else float(f"{v:.4g}") for k, v in out.items()}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="anime64")
    p.add_argument("--image-size", type=positive_int, default=64)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--sample-n", type=positive_int, default=256)
    # checked here, not when the loop reaches a misspelt name after profiling the ones before it
    p.add_argument("--paths", type=comma_choices(("reference", "fast")), default="reference,fast")
    p.add_argument("--workloads", type=comma_choices(("train", "sample")), default="train,sample")
    p.add_argument("--compile", default="default", help="torch.compile mode of the fast training step, or none")
    p.add_argument("--sample-compile", action="store_true",
                   help="torch.compile the fast sampler's model (off, as in benchmarks.sample)")
    p.add_argument("--kernels", default="auto", choices=KERNELS)
    p.add_argument("--warmup", type=non_negative_int, default=3)
    p.add_argument("--steps", type=positive_int, default=5, help="profiled steps per workload")
    p.add_argument("--top", type=positive_int, default=15)
    p.add_argument("--floor", action="store_true",
                   help="measure the bf16 matmul ceiling (fp32 on a CPU without bf16 instructions) and set each "
                        "step against the time it allows")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    allow_tf32()  # as the seed-style reference runs
    env = bench_env(preset=args.preset, batch_size=args.batch_size, sample_n=args.sample_n,
                    image_size=args.image_size, compile=args.compile, sample_compile=args.sample_compile,
                    kernels=args.kernels)
    if args.floor:
        env["ceiling"] = ceilings.matmul_TFLOPs(DEVICE)
    makers = {"train": train_workload, "sample": sample_workload}
    results = []
    for workload in args.workloads:
        for path in args.paths:
            w = makers[workload](path, args, DEVICE)
            _, warm_s = timed(lambda: [w.step() for _ in range(args.warmup)])
            row = {"workload": workload, "path": path, "warmup_s": round(warm_s, 2),
                   **profile_steps(w.step, args.steps, DEVICE, args.top)}
            results.append(row | rates(w, args, row, env.get("ceiling")))
            write_result("profile", {"env": env, "profile": results})  # after each: a timeout keeps the rest
            print(report_parts.profile(results[-1:], env, top=args.top), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
