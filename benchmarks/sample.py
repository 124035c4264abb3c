"""python -m benchmarks.sample: sampling 256 images with 1000 DDPM steps and with the few-step
default (the solver and NFE that matched DDPM-1000's KID), reference path and fast path in the
same run.

(a) reference: fp32 eager, the plain PyTorch update (FastSampler with no graph, torch backend);
(b) fast: bf16 autocast, channels_last, the model + fused update captured per step in a CUDA
    graph replayed for every step (sampling.py), optionally torch.compile.
A first call of each (warm-up: compile, capture) is timed apart. `--quick` times 100 of the
1000 DDPM steps and extrapolates. JSON to $OUT/sample.json when OUT is set, else
benchmarks/results/sample.json."""
from __future__ import annotations

import argparse
import time

import torch

from ddpm_fast import FastSampler, GaussianDiffusion, UNet
from ddpm_fast.plan import ExecutionPlan
from ddpm_fast.schedulers import DEFAULT_METHOD, DEFAULT_STEPS

from .common import write_result


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="anime64")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--ddpm-steps", type=int, help="DDPM steps actually run (default: all; --quick: 100)")
    p.add_argument("--few-step", default=f"{DEFAULT_METHOD}:{DEFAULT_STEPS}", metavar="METHOD:STEPS",
                   help="the few-step solver timed beside DDPM (default: the sample CLI's, measured against DDPM-1000)")
    p.add_argument("--paths", default="reference,fast")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in the fast path")
    p.add_argument("--kernels", default="auto", choices=("auto", "torch", "triton", "cpp"))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    run_steps = args.ddpm_steps or (min(100, args.timesteps) if args.quick else args.timesteps)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    diffusion = GaussianDiffusion("linear", args.timesteps)
    torch.manual_seed(0)
    base = UNet.from_preset(args.preset, image_size=args.image_size).to(device).eval()

    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "preset": args.preset, "n": args.n, "image_size": args.image_size, "quick": args.quick}
    few_method, few_steps = args.few_step.split(":")
    results = []
    for path in args.paths.split(","):
        fast = path == "fast"
        # The reference: fp32 eager, the plain PyTorch update; fast: bf16, channels_last, one CUDA graph.
        plan = ExecutionPlan.resolve(device, fast=fast, kernels=args.kernels if fast else "torch",
                                     compile="default" if args.compile else None)
        model = plan.prepare(base)
        for method, steps in (("ddpm", None), (few_method, int(few_steps))):
            sampler = FastSampler(model, diffusion, method=method, steps=steps, plan=plan)
            start = run_steps - 1 if method == "ddpm" else None
            n_steps = run_steps if method == "ddpm" else sampler.num_evaluations
            x_T = torch.randn(args.n, 3, args.image_size, args.image_size, device=device)
            go = lambda: sampler.sample(args.n, args.image_size, x_start=x_T, start_t=start)  # noqa: E731
            warm_s = timed(go, device)
            run_s = timed(go, device)
            full_steps = args.timesteps if method == "ddpm" else n_steps
            results.append({"path": path, "method": method, "steps_run": n_steps, "steps": full_steps,
                            "warmup_s": round(warm_s, 2), "s": round(run_s * full_steps / n_steps, 2),
                            "ms_per_step": round(1e3 * run_s / n_steps, 3)})
            for r in results:
                ref = next((q for q in results if q["path"] == "reference" and q["method"] == r["method"]), None)
                r["speedup_vs_reference"] = round(ref["s"] / r["s"], 2) if ref else None
            write_result("sample", {"env": env, "sample": results})  # after each: a timeout keeps the rest
    print(f"device: {env['device']}  {args.n} images of {args.image_size}x{args.image_size}, preset {args.preset}")
    print(f"{'path':10} {'method':6} {'steps':>6} {'seconds':>9} {'ms/step':>9} {'warm-up s':>9} {'x ref':>6}")
    for r in results:
        print(f"{r['path']:10} {r['method']:6} {r['steps']:6} {r['s']:9.2f} {r['ms_per_step']:9.3f} "
              f"{r['warmup_s']:9.2f} {r['speedup_vs_reference'] or '-':>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
