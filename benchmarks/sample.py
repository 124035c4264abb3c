"""python -m benchmarks.sample: sampling 256 images with 1000 DDPM steps and with 50 DDIM
steps, reference path and fast path in the same run.

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
    p.add_argument("--ddim-steps", type=int, default=50)
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
    results = []
    for path in args.paths.split(","):
        fast = path == "fast"
        model = base.set_backend(args.kernels if fast else "torch")
        if fast and device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        kw = dict(dtype=torch.bfloat16 if fast and device.type == "cuda" else None, compile=fast and args.compile,
                  cuda_graph="auto" if fast else False, backend=args.kernels if fast else "torch")
        for method, steps in (("ddpm", None), ("ddim", args.ddim_steps)):
            sampler = FastSampler(model, diffusion, method=method, steps=steps, **kw)
            start = run_steps - 1 if method == "ddpm" else None
            n_steps = run_steps if method == "ddpm" else len(sampler.timesteps)
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
