"""python -m benchmarks.sample: sampling 256 images with 1000 DDPM steps and with the few-step
default (the solver and NFE that matched DDPM-1000's KID), reference path and fast path in the
same run.

(a) reference: fp32 eager, the plain PyTorch update (FastSampler with no graph, torch backend);
(b) fast: bf16 autocast, channels_last, the model + fused update captured per step in a CUDA
    graph replayed for every step (sampling.py), optionally torch.compile.
A first call of each (warm-up: compile, capture) is timed apart. `--quick` times 100 of the
1000 DDPM steps and extrapolates. JSON to $OUT/sample.json when OUT is set, else benchmarks/results/."""
from __future__ import annotations

import argparse

import torch

from ddpm_fast import FastSampler, GaussianDiffusion, UNet
from ddpm_fast.argtypes import comma_choices, positive_int
from ddpm_fast.plan import KERNELS, ExecutionPlan
from ddpm_fast.schedulers import DEFAULT_METHOD, DEFAULT_STEPS, METHODS

from . import report_parts
from .common import DEVICE, bench_env, timed, write_result


def few_step(text: str) -> tuple[str, int]:
    """An argparse type: METHOD:STEPS, a sampler of METHODS and a step count >= 1."""
    method, _, steps = text.partition(":")
    if method not in METHODS or not steps.isdigit() or int(steps) < 1:
        raise argparse.ArgumentTypeError(f"expected METHOD:STEPS with METHOD one of {', '.join(METHODS)} and "
                                         f"STEPS an integer >= 1, like {DEFAULT_METHOD}:{DEFAULT_STEPS}; got {text!r}")
    return method, int(steps)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="anime64")
    p.add_argument("--image-size", type=positive_int, default=64)
    p.add_argument("--n", type=positive_int, default=256)
    p.add_argument("--timesteps", type=positive_int, default=1000)
    p.add_argument("--ddpm-steps", type=positive_int, help="DDPM steps actually run (default: all; --quick: 100)")
    p.add_argument("--few-step", type=few_step, default=f"{DEFAULT_METHOD}:{DEFAULT_STEPS}", metavar="METHOD:STEPS",
                   help="the few-step solver timed beside DDPM (default: the sample CLI's, measured against DDPM-1000)")
    p.add_argument("--paths", type=comma_choices(("reference", "fast")), default="reference,fast")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in the fast path")
    p.add_argument("--kernels", default="auto", choices=KERNELS)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.ddpm_steps and args.ddpm_steps > args.timesteps:  # the chain starts at step ddpm_steps - 1
        p.error(f"--ddpm-steps {args.ddpm_steps} is more than --timesteps {args.timesteps}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    run_steps = args.ddpm_steps or (min(100, args.timesteps) if args.quick else args.timesteps)
    diffusion = GaussianDiffusion("linear", args.timesteps)
    torch.manual_seed(0)
    base = UNet.from_preset(args.preset, image_size=args.image_size).to(DEVICE).eval()

    env = bench_env(preset=args.preset, n=args.n, image_size=args.image_size, quick=args.quick)
    few_method, few_steps = args.few_step
    results = []
    for path in args.paths:
        fast = path == "fast"
        plan = ExecutionPlan.resolve(DEVICE, fast=fast, kernels=args.kernels if fast else "torch",
                                     compile="default" if args.compile else None)
        model = plan.prepare(base)
        for method, steps in (("ddpm", None), (few_method, few_steps)):
            sampler = FastSampler(model, diffusion, method=method, steps=steps, plan=plan)
            start = run_steps - 1 if method == "ddpm" else None
            n_steps = run_steps if method == "ddpm" else sampler.num_evaluations
            x_T = torch.randn(args.n, 3, args.image_size, args.image_size, device=DEVICE)
            go = lambda: sampler.sample(args.n, args.image_size, x_start=x_T, start_t=start)  # noqa: E731
            warm_s, run_s = timed(go)[1], timed(go)[1]
            full_steps = args.timesteps if method == "ddpm" else n_steps
            results.append({"path": path, "method": method, "steps_run": n_steps, "steps": full_steps,
                            "warmup_s": round(warm_s, 2), "s": round(run_s * full_steps / n_steps, 2),
                            "ms_per_step": round(1e3 * run_s / n_steps, 3)})
            for r in results:
                ref = next((q for q in results if q["path"] == "reference" and q["method"] == r["method"]), None)
                r["speedup_vs_reference"] = round(ref["s"] / r["s"], 2) if ref else None
            write_result("sample", {"env": env, "sample": results})  # after each: a timeout keeps the rest
    print(report_parts.sample(results, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
