"""python -m benchmarks.cpu_speed: training and sampling speed on the CPU, ddpm-fast's reference
path, each part of its fast path alone and all together, against the plain diffusers loop of the
same model, in one run.

Training rows (TRAIN_ROWS), each in a process of its own (a clean peak RSS, no compile cache or
thread pool shared between rows), on the built-in data at the preset's size and the same batches:
  reference      fp32 eager: `python -m ddpm_fast.train --no-fast`
  bf16           bf16 autocast alone (fp32 master weights), the reference GroupNorm
  channels_last  channels_last alone
  compile        torch.compile alone (fp32)
  fast_eager     `python -m ddpm_fast.train --fast`, the default on the kinds of CPU where it measured
                 faster (plan.FAST_KINDS; on the others the default is the reference): bf16 and auto's
                 kernels (on the CPU the extension's GroupNorm where measured faster, and per pass:
                 tiny's attention trains on SDPA's math path), channels_last with the extension built
                 (plan.channels_last_pays), no compile
  fast           fast_eager + torch.compile: `--compile`
  diffusers      benchmarks/diffusers_loop.py: UNet2DModel of the same parameters, AdamW, EMA, fp32
and rows only on request (training and sampling): LAYOUT_ROWS, fast_eager in one layout whatever
the plan would pick: fast_nchw and fast_cl, how plan.channels_last_pays is decided; fp32_cl, the
reference (fp32) in channels_last with the extension's GroupNorm, the fast path's layout without
its bf16 (for a kind of CPU whose bf16 loses: benchmarks/RESULTS.md, "A CPU whose bf16 loses"); and
system_heap, the reference on malloc's default heap where the plan keeps freed memory in it
(plan.KEEP_HEAP, heap.py), so with the chunks that go with that heap: the ddpm-fast rows keep it as
the commands do, the diffusers row and the library row (the Python API) never.
Each row runs --warmup steps (the compile, reported apart as warmup_s), then --rounds rounds of the
preset's timed steps; img/s is the median over rounds with its min and max.

Sampling rows (SAMPLE_ROWS), --sample-n images with the default sampler (DPM-Solver++(2M) SDE on
Karras sigmas, 20 evaluations) on the same random weights: ddpm-fast's reference (fp32 eager),
fast_eager (`--fast`, the default where it measured faster: bf16, auto's kernels) and fast
(+ torch.compile), and diffusers' DDPMPipeline with DPMSolverMultistepScheduler(sde-dpmsolver++,
Karras), the same solver. ddpm-fast's rows sample on their plans as resolved, so in chunks where
this kind of CPU caps a model call on malloc's default heap (plan.EVAL_ELEMENTS: system_heap, the
library row). One more on request, library:
`FastSampler(model, diffusion)` as the Python API is called, no plan and the model as given (no
channels_last conversion, no set_backend). A first call of each is its warm-up (compile included);
then --rounds timed calls.

JSON to $OUT/cpu_speed.json when OUT is set, else benchmarks/results/; a table on stdout."""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from ddpm_fast.argtypes import non_negative_int, positive_int
from ddpm_fast.plan import KERNELS, OPS, ExecutionPlan
from ddpm_fast.presets import PRESETS

from . import report_parts
from .common import bench_env, child_json, forever, peak_rss_mib, spread, write_result

TRAIN_ROWS = ("reference", "bf16", "channels_last", "compile", "fast_eager", "fast", "diffusers")
SAMPLE_ROWS = ("reference", "fast_eager", "fast", "diffusers")
LAYOUT_ROWS = ("fast_nchw", "fast_cl", "fp32_cl")
HEAP_ROW = "system_heap"
LIBRARY_ROW = "library"
STEPS = {"tiny": 60, "cifar32": 8}  # timed steps per round: ~10 s of the reference on 2 cores


def plan_of(row: str, kernels: str = "auto"):
    """The execution plan of a ddpm-fast row: the reference with one part switched on, or all (the
    fast rows with `--kernels kernels`)."""
    ref = ExecutionPlan.resolve("cpu", fast=False)
    fast_eager = ExecutionPlan.resolve("cpu", fast=True, compile="none", kernels=kernels)
    return {"reference": ref,
            "bf16": replace(ref, autocast_dtype=torch.bfloat16, backends=dict.fromkeys(OPS, "torch")),
            "channels_last": replace(ref, channels_last=True), "compile": replace(ref, compile="default"),
            "fast_eager": fast_eager, "fast": replace(fast_eager, compile="default"),
            "fast_nchw": replace(fast_eager, channels_last=False),
            "fast_cl": replace(fast_eager, channels_last=True),
            "fp32_cl": replace(ref, channels_last=True, backends={**ref.backends, "group_norm_act": "cpp"}),
            HEAP_ROW: ExecutionPlan.resolve("cpu", fast=False, keep_heap=False)}[row]


def train_row(row: str, args) -> dict:
    """One training row, in this process."""
    from ddpm_fast.training.config import TrainConfig
    from ddpm_fast.training.run import build_run

    steps = args.steps or STEPS.get(args.preset, 10)
    total = args.warmup + args.rounds * steps
    size = {"image_size": args.image_size} if args.image_size else {}
    if row == "diffusers":
        from ddpm_fast.data import build_loader

        from .diffusers_loop import DiffusersLoop

        peer = DiffusersLoop(args.preset, args.image_size, lr=2e-4, steps=total, seed=0)
        loader = build_loader(None, peer.unet.config.sample_size, args.batch_size, seed=0, num_workers=0,
                              device="cpu")
        step = lambda s, x0: peer.step(x0)  # noqa: E731
    else:
        with tempfile.TemporaryDirectory() as out:
            cfg = TrainConfig(preset=args.preset, batch_size=args.batch_size, lr=2e-4, warmup=0, steps=total,
                              workers=0, out=out, **size)
            run = build_run(cfg, plan=plan_of(row, args.kernels))
        run.plan.apply_to_process()  # as the commands do
        loader, step = run.loader, run.step_fn
    batches = forever(loader)
    t0 = time.perf_counter()
    for s in range(args.warmup):
        step(s, next(batches))
    warm_s = time.perf_counter() - t0
    rates = []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        for s in range(steps):
            step(args.warmup + r * steps + s, next(batches))
        rates.append(steps * args.batch_size / (time.perf_counter() - t0))
    return {"row": row, "preset": args.preset, "img_per_s": spread(rates), "warmup_s": round(warm_s, 2),
            "timed_steps": steps, "peak_rss_mib": round(peak_rss_mib(), 1)}


def sample_row(row: str, args) -> dict:
    """One sampling row, in this process: --sample-n images, default sampler, random weights."""
    from ddpm_fast import FastSampler, GaussianDiffusion, UNet
    from ddpm_fast.schedulers import DEFAULT_STEPS

    torch.manual_seed(0)
    size = {"image_size": args.image_size} if args.image_size else {}
    model = UNet.from_preset(args.preset, **size).eval()
    s = model.config["image_size"]
    diffusion = GaussianDiffusion("linear", 1000)
    if row == "diffusers":
        from .diffusers_loop import pipeline_sampler

        go = pipeline_sampler(model, diffusion, args.sample_n)
    elif row == LIBRARY_ROW:
        sampler = FastSampler(model, diffusion)
        go = lambda: sampler.sample(args.sample_n, s, generator=torch.Generator().manual_seed(0))  # noqa: E731
    else:
        plan = plan_of(row, args.kernels)
        plan.apply_to_process()  # as the commands do
        sampler = FastSampler(plan.prepare(model), diffusion, plan=plan)
        go = lambda: sampler.sample(args.sample_n, s, generator=torch.Generator().manual_seed(0))  # noqa: E731
    with torch.inference_mode():
        t0 = time.perf_counter()
        go()
        warm_s = time.perf_counter() - t0
        times = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            go()
            times.append(time.perf_counter() - t0)
    return {"row": row, "preset": args.preset, "n": args.sample_n, "evaluations": DEFAULT_STEPS,
            "s": spread(times), "img_per_s": spread([args.sample_n / t for t in times]),
            "warmup_s": round(warm_s, 2), "peak_rss_mib": round(peak_rss_mib(), 1)}


def child(kind: str, row: str, preset: str, args) -> dict:
    """Run one row in a fresh process and return its JSON."""
    argv = ["--one", f"{kind}:{row}", "--presets", preset, "--batch-size", str(args.batch_size), "--warmup",
            str(args.warmup), "--rounds", str(args.rounds), "--sample-n", str(args.sample_n), "--kernels", args.kernels]
    argv += ["--steps", str(args.steps)] if args.steps else []
    argv += ["--image-size", str(args.image_size)] if args.image_size else []
    return child_json("benchmarks.cpu_speed", argv, f"{kind} row {row} ({preset})")


def ratios(rows: list[dict]) -> None:
    """Each row's median img/s against the same preset's reference and diffusers rows."""
    for r in rows:
        for base in ("reference", "diffusers"):
            b = next((q for q in rows if q["preset"] == r["preset"] and q["row"] == base), None)
            r[f"vs_{base}"] = round(r["img_per_s"]["median"] / b["img_per_s"]["median"], 2) if b else None


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,cifar32")
    p.add_argument("--train-rows", default=",".join(TRAIN_ROWS))
    p.add_argument("--sample-rows", default=",".join(SAMPLE_ROWS), help="empty: no sampling rows")
    p.add_argument("--sample-presets", default="tiny")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--image-size", type=positive_int, help="default: the preset's")
    p.add_argument("--steps", type=positive_int, help=f"timed steps per round (default: {STEPS})")
    p.add_argument("--warmup", type=non_negative_int, default=3,
                   help="steps before timing (compile, allocator, oneDNN plans)")
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--sample-n", type=positive_int, default=64)
    p.add_argument("--kernels", default="auto", choices=KERNELS,
                   help="the fast rows' --kernels (auto: the CPU's choice)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # KIND:ROW, run in this process (the children)
    args = p.parse_args(argv)
    # plain strings, not comma_choices: an empty list (`--train-rows ""`) is a documented run; the
    # presets too, which would otherwise fail in a child after the rows before them
    for name, allowed in (("--train-rows", TRAIN_ROWS + LAYOUT_ROWS + (HEAP_ROW,)),
                          ("--sample-rows", SAMPLE_ROWS + LAYOUT_ROWS + (HEAP_ROW, LIBRARY_ROW)),
                          ("--presets", tuple(PRESETS)), ("--sample-presets", tuple(PRESETS))):
        bad = [r for r in getattr(args, name[2:].replace("-", "_")).split(",") if r and r not in allowed]
        if bad:
            p.error(f"{name}: unknown name(s) {', '.join(bad)} (of {', '.join(allowed)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.one:
        kind, row = args.one.split(":")
        args.preset = args.presets
        print(json.dumps((train_row if kind == "train" else sample_row)(row, args)))
        return 0

    env = bench_env(threads=torch.get_num_threads(), batch_size=args.batch_size, warmup=args.warmup,
                    rounds=args.rounds, sample_n=args.sample_n, cpu_count=os.cpu_count(), kernels=args.kernels,
                    fast_eager_plan=plan_of("fast_eager", args.kernels).describe(),
                    reference_plan=plan_of("reference").describe())
    result: dict = {"env": env, "train": [], "sample": []}
    for kind, presets, rows in (("train", args.presets, args.train_rows),
                                ("sample", args.sample_presets, args.sample_rows)):
        for preset in (x for x in presets.split(",") if x):
            for row in (x for x in rows.split(",") if x):
                result[kind].append(child(kind, row, preset, args))
                ratios(result[kind])
                print(json.dumps(result[kind][-1]), flush=True)
                write_result("cpu_speed", result)  # after each row: a cut-off run keeps the rest
    print(report_parts.cpu_speed(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
