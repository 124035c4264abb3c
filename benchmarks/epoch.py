"""python -m benchmarks.epoch: one training epoch end to end (loader + step), reference path
and fast path in the same run, both the trainer's own runs (training.run.build_run).

(a) reference: what the original script does: fp32 (TF32 matmuls on a GPU), eager, a PIL
    DataLoader (`--loader torch`), Adam, EMA;
(b) fast: bf16 autocast with fp32 master weights, channels_last, torch.compile, the whole step
    in one CUDA graph (training/step.py), the GPU-resident uint8 cache (`--loader auto`);
(c) fast_eager: (b) without torch.compile. The GPU suite runs reference, fast_eager, fast in that
    order: the compile is the slow, uncertain part, so its timeout still leaves (a) and (c).

Each path runs `--warmup` steps (compile, graph capture, cuDNN plans: reported apart), then
`--steps` synchronised timed steps (default: one epoch), extrapolated to `--epoch-images` (57,208:
the anime-face train split); speedups against (a) and against the original script's 210 s on an
RTX 3090 (as epoch-time ratio, and as img/s ratio with its epoch taken as all 63,565 images: 303
img/s; docs/DESIGN.md). JSON to $OUT/epoch.json when OUT is set, else benchmarks/results/."""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from ddpm_fast.argtypes import non_negative_int, positive_int
from ddpm_fast.plan import KERNELS
from ddpm_fast.training.config import TrainConfig
from ddpm_fast.training.run import build_run

from . import report_parts
from .common import DEVICE, allow_tf32, bench_env, forever, timed, write_result
from .data_loading import folder_size_for_epoch, make_sources

SEED_EPOCH_S = 210.0          # the original script on an RTX 3090
SEED_IMG_PER_S = 63565 / 210  # its epoch taken as all 63,565 images (the conservative ratio)


def run_path(path: str, data: Path, args, device: torch.device) -> dict:
    fast = path in ("fast", "fast_eager")
    compile_mode = "none" if path == "fast_eager" else args.compile
    cfg = TrainConfig(data=str(data), preset=args.preset, image_size=args.image_size, batch_size=args.batch_size,
                      lr=2e-4, warmup=0, steps=args.warmup + args.steps, fast=fast, compile=compile_mode,
                      kernels=args.kernels if fast else "torch", loader=args.fast_loader if fast else "torch",
                      workers=args.workers, device=str(device), out=str(args.workdir / f"run-{path}"))
    run = build_run(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = forever(run.loader)
    _, warm_s = timed(lambda: [run.step_fn(s, next(batches)) for s in range(args.warmup)])
    losses, timed_s = timed(lambda: [run.step_fn(s, next(batches)) for s in range(args.warmup, run.total)])
    img_s = args.steps * args.batch_size / timed_s
    return {
        "path": path, "loader": run.loader.backend, "cache_build_s": round(run.loader.build_seconds, 2),
        "warmup_steps": args.warmup, "warmup_s": round(warm_s, 2), "timed_steps": args.steps,
        "timed_s": round(timed_s, 3), "img_per_s": round(img_s, 1),
        "epoch_s": round(args.epoch_images / img_s, 2),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "final_loss": float(torch.stack(losses).mean()),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.epoch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="JPEG folder (default: generated 96x96 sources)")
    p.add_argument("--preset", default="anime64")
    p.add_argument("--image-size", type=positive_int, default=64)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--epoch-images", type=positive_int, default=57208)
    p.add_argument("--steps", type=positive_int, help="timed steps (default: one epoch)")
    p.add_argument("--warmup", type=non_negative_int, default=10)
    p.add_argument("--paths", default="reference,fast", help="comma-separated: reference, fast, fast_eager")
    p.add_argument("--compile", default="default", help="torch.compile mode of the fast path, or none")
    p.add_argument("--kernels", default="auto", choices=KERNELS)
    p.add_argument("--fast-loader", default="auto")
    p.add_argument("--workers", type=non_negative_int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--quick", action="store_true", help="reduced run: 40 timed steps, a 4,096-image folder")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ddpm_fast_bench")
    args = p.parse_args(argv)
    unknown = set(args.paths.split(",")) - {"reference", "fast", "fast_eager"}
    if unknown:
        p.error(f"--paths: unknown path(s) {', '.join(sorted(unknown))} (reference, fast, fast_eager)")
    if args.steps is None:
        args.steps = 40 if args.quick else args.epoch_images // args.batch_size
        if not args.steps:  # no timed step: the rates would divide by zero after the warm-up
            p.error(f"--epoch-images {args.epoch_images} is less than one --batch-size {args.batch_size} batch; "
                    "give --steps")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    allow_tf32()  # the seed-style reference runs TF32 matmuls
    n_files = 4096 if args.quick else folder_size_for_epoch(args.epoch_images)
    data = args.data or make_sources(args.workdir / f"jpeg96-{n_files}", n_files)

    env = bench_env(preset=args.preset, batch_size=args.batch_size, image_size=args.image_size,
                    epoch_images=args.epoch_images, quick=args.quick)
    results = []
    for path in args.paths.split(","):
        results.append(run_path(path, data, args, DEVICE))
        ref = next((r for r in results if r["path"] == "reference"), None)
        for r in results:
            r["speedup_vs_reference"] = round(ref["epoch_s"] / r["epoch_s"], 2) if ref else None
            r["speedup_vs_3090_epoch"] = round(SEED_EPOCH_S / r["epoch_s"], 1)
            r["speedup_vs_3090_img_per_s"] = round(r["img_per_s"] / SEED_IMG_PER_S, 1)
        write_result("epoch", {"env": env, "epoch": results})  # after each path: a timeout keeps the first
    print(report_parts.epoch(results, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
