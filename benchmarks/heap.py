"""python -m benchmarks.heap: a training step with freed memory kept in the heap against malloc's
default, in turn, each run a fresh process.

glibc's malloc maps each large block afresh and unmaps it on free, so every step faults the pages
of its activations in again (ddpm_fast/heap.py). Each run builds the run as `python -m
ddpm_fast.train` does, on the CPU's default path (--no-fast: the reference, fp32; --fast: bf16 and
the rest of the fast path), takes --warmup steps, then times --steps steps, and reports the median
ms of a step and the minor page faults per step (getrusage) besides its peak RSS. `kept` calls
heap.keep_freed_memory() after building the run, as the training loop does; `system` leaves malloc
as it is. The two alternate (kept, system, kept, ...) for --pairs pairs, so the machine's drift
falls on both; the ratio is taken pair by pair. Use it on a kind of CPU before adding it to plan.KEEP_HEAP.

JSON to $OUT/heap.json when OUT is set, else benchmarks/results/; a table on stdout."""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time

from ddpm_fast.argtypes import non_negative_int, positive_int
from ddpm_fast.presets import PRESETS

from . import report_parts
from .common import bench_env, child_json, peak_rss_mib, spread, write_result

MODES = ("kept", "system")


def one_run(mode: str, args: argparse.Namespace) -> dict:
    """One run in this process: build, warm up, time; the step's median ms and its faults."""
    import torch

    from ddpm_fast.heap import keep_freed_memory
    from ddpm_fast.plan import ExecutionPlan
    from ddpm_fast.training.config import TrainConfig
    from ddpm_fast.training.run import build_run

    size = {"image_size": args.image_size} if args.image_size else {}
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(preset=args.preset, batch_size=args.batch_size, warmup=0, workers=0, out=out,
                          steps=args.warmup + args.steps, **size)
        plan = ExecutionPlan.resolve("cpu", fast=args.fast)
        run = build_run(cfg, plan=plan)
    kept = keep_freed_memory() if mode == "kept" else False
    batches = iter(run.loader)
    for s in range(args.warmup):
        run.step_fn(s, next(batches))
    times, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for s in range(args.warmup, args.warmup + args.steps):
        batch = next(batches)
        t0 = time.perf_counter()
        run.step_fn(s, batch)
        times.append(time.perf_counter() - t0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"mode": mode, "kept": kept, "bf16": plan.autocast_dtype == torch.bfloat16,
            "step_ms": round(1000 * statistics.median(times), 1), "minor_faults_per_step": round(faults / args.steps),
            "threads": torch.get_num_threads(), "peak_rss_mib": round(peak_rss_mib(), 1)}


def child(mode: str, args: argparse.Namespace) -> dict:
    argv = ["--one", mode, "--preset", args.preset, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
            "--warmup", str(args.warmup)]
    argv += ["--image-size", str(args.image_size)] if args.image_size else []
    argv += [] if args.fast is None else ["--fast" if args.fast else "--no-fast"]
    return child_json("benchmarks.heap", argv, f"the {mode} run")


def summary(runs: list[dict]) -> dict:
    """Per mode: the spread of the runs' step medians, faults and peaks; and the pairs' ratios."""
    out = {m: {key: spread([r[key] for r in runs if r["mode"] == m], 1)
               for key in ("step_ms", "minor_faults_per_step", "peak_rss_mib")} for m in MODES}
    kept, system = ([r for r in runs if r["mode"] == m] for m in MODES)
    out["kept_over_system"] = spread([k["step_ms"] / s["step_ms"] for k, s in zip(kept, system)], 3)
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.heap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--image-size", type=positive_int, help="default: the preset's")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--steps", type=positive_int, default=5, help="timed steps a run")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="steps before timing (oneDNN's plans)")
    p.add_argument("--pairs", type=positive_int, default=4, help="runs of each mode, in turn")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="the fast path or (--no-fast) the reference; default: the CPU's default, as train's")
    p.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # a child: one run in this process
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.one:
        print(json.dumps(one_run(args.one, args)))
        return 0
    from ddpm_fast.plan import KEEP_HEAP, ExecutionPlan

    plan = ExecutionPlan.resolve("cpu", fast=args.fast)
    result = {"env": bench_env(preset=args.preset, image_size=args.image_size, batch_size=args.batch_size,
                               steps=args.steps, warmup=args.warmup, pairs=args.pairs, fast=args.fast,
                               plan=plan.describe(), keep_heap_kinds=sorted(KEEP_HEAP)), "runs": []}
    for _ in range(args.pairs):
        for mode in MODES:
            result["runs"].append(child(mode, args))
            print(json.dumps(result["runs"][-1]), flush=True)
            write_result("heap", result)  # after each run: a cut-off run keeps the rest
    result["summary"] = summary(result["runs"])
    write_result("heap", result)
    print(report_parts.heap(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
