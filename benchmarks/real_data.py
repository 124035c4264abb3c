"""python -m benchmarks.real_data: ddpm-fast and the diffusers training loop side by side on a public
real image set, KID against held-out images as they train.

Data: the glyphs of Debian's fonts-noto-color-emoji (benchmarks/emoji_set.py says which and how they are
drawn), rendered once into --data-dir; ddpm-fast's loader splits the folder 90/5/5 and both systems
train on its train split, in the same batches (one loader, each batch given to both), without flips
(letters, digits and arrows are not mirror images of themselves). KID is against the test split.

The two systems, from the same seed (the same initial weights: both build the preset's UNet after
seeding), batch, lr and steps, each otherwise as its user gets it:
  ddpm-fast  build_run(TrainConfig(...)) on its default path for the device (on the CPU the fast path,
             bf16 autocast; --fast/--no-fast choose): Adam, constant lr after the preset's warm-up, EMA
  diffusers  benchmarks/diffusers_loop.py, train_unconditional's loop on the same UNet: AdamW,
             cosine lr after its warm-up, EMA with power-3/4 warm-up
Every --eval-every steps (and at the last) each EMA model draws --kid-samples images (the same noise
seed at every point) with
  default    its own default sampler: ddpm-fast's FastSampler (DPM-Solver++(2M) SDE, Karras, 20
             evaluations) and diffusers' DDIMPipeline, 50 steps, as train_unconditional samples;
  common     one sampler for both: ddpm-fast's default solver on each model (for ddpm-fast the same
             samples as its default row),
scored by KID (FID too when there are >= 2048 samples) against the test split's Inception features.
Training seconds count the optimizer steps alone (evaluation apart), a compile warm-up included.
Everything runs on the CPU (the diffusers loop is a CPU loop).

JSON to $OUT/real_data.json when OUT is set, else benchmarks/results/, rewritten after each
evaluation (a cut-off run keeps the rest); a plot of KID against steps and against training seconds
beside it (real_data.png); a markdown table on stdout."""
from __future__ import annotations

import argparse
import inspect
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ddpm_fast import FastSampler
from ddpm_fast.argtypes import int_tuple, number, positive_float, positive_int
from ddpm_fast.data.listing import list_images
from ddpm_fast.data.split import split_files
from ddpm_fast.diffusion import LOSS_WEIGHTS
from ddpm_fast.evaluation import FID_MIN_SAMPLES, generate, score_samples
from ddpm_fast.presets import PRESETS
from ddpm_fast.training.config import TrainConfig
from ddpm_fast.training.run import build_run

from .common import bench_env, environment, forever, result_path, write_result
from .diffusers_loop import DiffusersLoop
from .emoji_set import FontMissing, build_emoji_set
from .report_parts import md_table

SYSTEMS = ("ddpm-fast", "diffusers")
SAMPLERS = ("default", "common")
SAMPLE_SEED = 1234  # every evaluation's noise: each point and system is scored on the same draws
DDIM_STEPS = 50  # DDIMPipeline's default, train_unconditional's sampler
MIN_IMAGES = 40  # the fewest glyphs whose 5% test split holds the 2 images KID needs
DEVICE = torch.device("cpu")


def ddim_samples(peer: DiffusersLoop, unet: torch.nn.Module, n: int, seed: int) -> torch.Tensor:
    """n images of diffusers' DDIMPipeline (DDIM_STEPS steps, eta 0) on the loop's own scheduler, as
    train_unconditional builds it, in [-1, 1], (N, 3, S, S)."""
    from diffusers import DDIMPipeline

    pipe = DDIMPipeline(unet=unet, scheduler=peer.scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=n, generator=torch.Generator().manual_seed(seed), num_inference_steps=DDIM_STEPS,
                  output_type="np").images
    return torch.from_numpy(images).permute(0, 3, 1, 2).mul(2).sub(1)


def score(samples: torch.Tensor, args) -> dict:
    n = len(samples)
    r = score_samples(samples, str(args.data_dir), args.image_size, DEVICE, fid_n=n if n >= FID_MIN_SAMPLES else 0,
                      kid_n=n, seed=0, splits=("test",))
    return {"kid": r["kid_test"], "kid_std": r["kid_test_std"], "fid": r.get("fid_test")}


def evaluate(run, peer, step: int, seed: int, train_s: dict, args) -> list[dict]:
    """The rows of one evaluation point: each system with each sampler."""
    n = args.kid_samples
    ours = FastSampler(run.ema.model, run.diffusion, plan=run.plan.with_graphs(False))
    unet = peer.ema_unet()
    # the diffusers UNet's output has .sample; same schedule; fp32, as the committed figures were sampled
    common = FastSampler(unet, run.diffusion, dtype=torch.float32)
    draws = {
        ("ddpm-fast", "default"): (f"{ours.method}, {ours.num_evaluations} evaluations",
                                   lambda: generate(ours, n, args.image_size, DEVICE, seed=SAMPLE_SEED)),
        ("diffusers", "default"): (f"DDIMPipeline, {DDIM_STEPS} steps", lambda: ddim_samples(peer, unet, n, SAMPLE_SEED)),
        ("diffusers", "common"): (f"{common.method}, {common.num_evaluations} evaluations",
                                  lambda: generate(common, n, args.image_size, DEVICE, seed=SAMPLE_SEED)),
    }
    rows = []
    for (system, sampler), (name, draw) in draws.items():
        t0 = time.perf_counter()
        with torch.inference_mode():
            samples = draw()
        sample_s = time.perf_counter() - t0
        rows.append({"seed": seed, "step": step, "system": system, "sampler": sampler, "sampler_name": name,
                     "path": run.plan.describe() if system == "ddpm-fast" else "fp32 eager",
                     "train_s": round(train_s[system], 3), "sample_s": round(sample_s, 3), **score(samples, args)})
    # ddpm-fast's default sampler is the common one: the same samples, scored once
    rows.append(dict(rows[0], sampler="common", same_samples_as="default"))
    return rows


def build_pair(seed: int, args) -> tuple:
    """(ddpm-fast's run, the diffusers loop), each seeded with `seed`."""
    with tempfile.TemporaryDirectory() as out:  # build_run writes nothing; its folder must merely be free
        cfg = TrainConfig(data=str(args.data_dir), preset=args.preset, image_size=args.image_size,
                          batch_size=args.batch_size, lr=args.lr, steps=args.steps, seed=seed, flip=False,
                          loss_weight=args.loss_weight,
                          fast=args.fast, workers=0, device="cpu", out=out)
        run = build_run(cfg)
    return run, DiffusersLoop(args.preset, args.image_size, lr=args.lr, steps=args.steps, seed=seed)


def run_seed(seed: int, args, on_eval: Callable[[list[dict], float], None]) -> None:
    """Train both systems from `seed` in the same batches, evaluating every --eval-every steps."""
    # A throwaway step of each first: the process's first-call costs (oneDNN generating its kernels, a
    # compile's caches) would otherwise land on whichever system steps first.
    spare, spare_peer = build_pair(seed, args)
    x0 = next(iter(spare.loader))
    spare.step_fn(0, x0)
    spare_peer.step(x0.clone(memory_format=torch.contiguous_format))
    run, peer = build_pair(seed, args)
    train_s = dict.fromkeys(SYSTEMS, 0.0)
    batches = forever(run.loader)
    for step in tqdm(range(1, args.steps + 1), desc=f"seed {seed}: both systems' steps", leave=False):
        x0 = next(batches)
        x_peer = x0.clone(memory_format=torch.contiguous_format)  # its own copy: neither step sees the other's
        t0 = time.perf_counter()
        run.step_fn(step - 1, x0)
        t1 = time.perf_counter()
        peer.step(x_peer)
        t2 = time.perf_counter()
        train_s["ddpm-fast"] += t1 - t0
        train_s["diffusers"] += t2 - t1
        if step % args.eval_every == 0 or step == args.steps:
            t0 = time.perf_counter()
            rows = evaluate(run, peer, step, seed, train_s, args)
            on_eval(rows, time.perf_counter() - t0)


def summary(rows: list[dict]) -> list[dict]:
    """Per (step, system, sampler): mean train seconds and KID over the seeds, and KID's spread: the
    standard deviation over seeds when there are several, else the KID estimate's own."""
    out = []
    keys = sorted({(r["step"], r["system"], r["sampler"]) for r in rows},
                  key=lambda k: (k[0], SYSTEMS.index(k[1]), SAMPLERS.index(k[2])))
    for step, system, sampler in keys:
        group = [r for r in rows if (r["step"], r["system"], r["sampler"]) == (step, system, sampler)]
        kids = [r["kid"] for r in group]
        out.append({"step": step, "system": system, "sampler": sampler, "sampler_name": group[0]["sampler_name"],
                    "seeds": len(group), "train_s": statistics.mean(r["train_s"] for r in group),
                    "kid": statistics.mean(kids),
                    "kid_spread": statistics.stdev(kids) if len(kids) > 1 else group[0]["kid_std"]})
    return out


def table(rows: list[dict]) -> str:
    s = summary(rows)
    cell = {(r["step"], r["system"], r["sampler"]): r for r in s}
    columns = [("ddpm-fast", "default"), ("diffusers", "default"), ("diffusers", "common")]
    names = [f"KID {sys} ({cell[(s[0]['step'], sys, smp)]['sampler_name']})" for sys, smp in columns]
    body = [[step, f"{cell[(step, 'ddpm-fast', 'default')]['train_s']:.1f}",
             f"{cell[(step, 'diffusers', 'default')]['train_s']:.1f}",
             *(f"{cell[(step, *c)]['kid']:.4f} ± {cell[(step, *c)]['kid_spread']:.4f}" for c in columns)]
            for step in sorted({r["step"] for r in s})]
    seeds = s[0]["seeds"]
    spread = "the standard deviation over the seeds" if seeds > 1 else "the KID estimate's own standard deviation"
    return (f"Mean over {seeds} seed(s); ± is {spread}. ddpm-fast's own sampler is also the common one.\n\n"
            + md_table(["step", "ddpm-fast train s", "diffusers train s", *names], body))


def plot(rows: list[dict], path: Path) -> Path:
    """KID against steps and against training seconds, one line per system and sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for system, sampler in [("ddpm-fast", "default"), ("diffusers", "default"), ("diffusers", "common")]:
        line = [r for r in s if (r["system"], r["sampler"]) == (system, sampler)]
        label = f"{system}, {line[0]['sampler_name']}"
        for ax, x in zip(axes, ("step", "train_s")):
            ax.errorbar([r[x] for r in line], [r["kid"] for r in line], yerr=[r["kid_spread"] for r in line],
                        marker="o", capsize=3, label=label)
    axes[0].set(xlabel="optimizer steps", ylabel="KID against the test split (lower is better)")
    axes[1].set(xlabel="training seconds (evaluation apart)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Noto Color Emoji: ddpm-fast and the diffusers loop, same data, batch, lr, steps, seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.real_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=positive_int, default=3000)
    p.add_argument("--eval-every", type=positive_int, default=500, help="steps between evaluations (and the last)")
    p.add_argument("--seeds", type=int_tuple, default=(0,), help="comma-separated, e.g. 0,1")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--kid-samples", type=number(int, 2), default=256, help="samples of each KID (FID too from 2048)")
    p.add_argument("--image-size", type=number(int, 8, 128), default=32, help="a multiple of 8")
    p.add_argument("--data-dir", type=Path, help="where the rendered glyphs are kept (default: build/emoji<SIZE>, "
                                                 "with a limit build/emoji<SIZE>-<LIMIT>)")
    p.add_argument("--limit", type=number(int, MIN_IMAGES), help="render only this many glyphs, evenly spaced over "
                                                                 "the font (a smoke run)")
    p.add_argument("--loss-weight", choices=LOSS_WEIGHTS, default=TrainConfig().loss_weight,
                   help="ddpm-fast's loss weight (default: the trainer's; the diffusers loop's is uniform, "
                        "train_unconditional's plain MSE)")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction,
                   help="ddpm-fast on its fast path (--no-fast: its fp32 reference; default: its own default for the "
                        "device)")
    args = p.parse_args(argv)
    if args.image_size % 8:
        p.error(f"--image-size must be a multiple of 8 (the presets halve it up to 3 times), got {args.image_size}")
    if not args.seeds or min(args.seeds) < 0:
        p.error(f"--seeds: give one or more seeds >= 0, like 0,1; got {args.seeds}")
    if args.data_dir is None:
        root = Path(__file__).resolve().parents[1] / "build"
        args.data_dir = root / (f"emoji{args.image_size}" + (f"-{args.limit}" if args.limit else ""))
    if args.data_dir.exists() and not args.data_dir.is_dir():
        p.error(f"--data-dir {args.data_dir} is a file, not a folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        emoji = build_emoji_set(args.data_dir, args.image_size, args.limit)
    except (FontMissing, ValueError) as e:
        raise SystemExit(f"benchmarks.real_data: {e}") from None
    files = list_images(emoji.folder)
    splits = {split: len(split_files(files, split)) for split in ("train", "val", "test")}
    print(f"data: {len(files)} glyphs of Noto Color Emoji at {args.image_size} px in {emoji.folder} "
          f"({'rendered now' if emoji.built else 'already there'}; {emoji.blank} code points draw nothing); "
          + ", ".join(f"{k} {v}" for k, v in splits.items()), flush=True)
    data = {"set": "glyphs of Debian's fonts-noto-color-emoji", "folder": str(emoji.folder), "images": len(files),
            "splits": splits, "limit": args.limit}
    # each system's lr warm-up: the preset's, and DiffusersLoop's default (at most half the run)
    warmup = {"ddpm-fast": TrainConfig(preset=args.preset).warmup,
              "diffusers": min(inspect.signature(DiffusersLoop).parameters["warmup"].default, args.steps // 2)}
    env = bench_env(**environment(), device="cpu", cpu_count=os.cpu_count(), steps=args.steps,
                    eval_every=args.eval_every, seeds=list(args.seeds), batch_size=args.batch_size, lr=args.lr,
                    preset=args.preset, image_size=args.image_size, fast=args.fast, loss_weight=args.loss_weight,
                    kid_samples=args.kid_samples, sample_seed=SAMPLE_SEED, warmup_steps=warmup, data=data)
    result: dict = {"env": env, "rows": [], "eval_s": []}

    def on_eval(rows: list[dict], eval_s: float) -> None:
        result["rows"] += rows
        result["eval_s"].append(round(eval_s, 2))
        write_result("real_data", result)
        print(f"seed {rows[0]['seed']} step {rows[0]['step']}: " + ", ".join(
            f"{r['system']} {r['sampler']} KID {r['kid']:.4f} ({r['train_s']:.0f} s trained)" for r in rows[:3])
            + f"; {eval_s:.0f} s to evaluate", flush=True)

    for seed in args.seeds:
        run_seed(seed, args, on_eval)
    png = plot(result["rows"], result_path("real_data").with_suffix(".png"))
    print(table(result["rows"]))
    print(f"\nJSON {result_path('real_data')}, plot {png}")
    bad = [r for r in result["rows"] if not math.isfinite(r["kid"])]
    if bad:
        print(f"{len(bad)} evaluation(s) gave a non-finite KID", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
