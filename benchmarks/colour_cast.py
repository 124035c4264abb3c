"""python -m benchmarks.colour_cast: on a folder of greyscale images (R = G = B), how far from grey
are a short run's samples, and which training choice makes the difference?

The data is the embedded set made grey, written once as PNGs. Every run trains the tiny preset
for --steps at --batch-size from one seed and draws --samples samples from its EMA model three
ways (SAMPLERS): DDIM-50 (the issue's yardstick) with the clip's two readings, the direction's
eps re-derived from the clipped x0 (ddim's default) or the network's own (diffusers' DDIMPipeline,
the same update: tests/test_schedulers.py), and ddpm-fast's default sampler. The cast is the mean over samples
and pixels of |channel - grey| in 0..255 units (grey = the mean of the three channels); the
contrast, the pixels' standard deviation in the same units beside the data's, tells a grey sample
from a washed-out one. The runs:

- `diffusers`: the plain diffusers loop of benchmarks/diffusers_loop.py (train_unconditional's,
  on the same tiny model); sampled by FastSampler on the diffusers UNet;
- `ddpm-fast`: the trainer's defaults; then one change at a time from them (--changes): the
  optimizer, its betas, the lr schedule, the EMA, the loss weighting, the loader.

Writes colour_cast.json and .md to $OUT when set, else benchmarks/results/."""
from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from ddpm_fast.argtypes import positive_float, positive_int, seed_int
from ddpm_fast.data import load_images
from ddpm_fast.data.embedded import embedded_images

from ddpm_fast.schedulers import DEFAULT_METHOD

from .common import forever, write_result
from .report_parts import md_table

# One change from the trainer's defaults each, as TrainConfig fields.
CHANGES = {
    "adamw": dict(optimizer="adamw", adam_beta1=0.95, weight_decay=1e-6),
    "beta1_0.95": dict(adam_beta1=0.95),
    "cosine_lr_warmup_500": dict(lr_schedule="cosine", warmup=500),
    "no_ema": dict(ema_decay=0.0),
    "no_grad_clip": dict(grad_clip=0.0),
    "uniform_weight": dict(loss_weight="uniform"),  # Ho et al.'s; the default before min-SNR ("min_snr" then)
    "no_flip": dict(flip=False),
}


def grey_folder(root: Path, size: int = 32) -> Path:
    done = root / "COMPLETE"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        grey = embedded_images(4096, size).float().mean(-1).round().byte().numpy()
        for i, g in enumerate(grey):
            Image.fromarray(g, mode="L").save(root / f"{i:05d}.png")
        done.write_text("4096")
    return root


def colour_cast(images: torch.Tensor) -> float:
    """Mean |channel - grey| in 0..255 units of (N, 3, H, W) images in [-1, 1]."""
    x = (images.clamp(-1, 1) + 1) * 127.5
    return float((x - x.mean(1, keepdim=True)).abs().mean())


def contrast(images: torch.Tensor) -> float:
    """The pixels' standard deviation in 0..255 units of images in [-1, 1]."""
    return float(((images.clamp(-1, 1) + 1) * 127.5).std())


def measure(images: dict[str, torch.Tensor]) -> dict:
    """{sampler: images} -> the row's figures: cast_SAMPLER and contrast_SAMPLER."""
    out = {}
    for name, x in images.items():
        out[f"cast_{name}"], out[f"contrast_{name}"] = round(colour_cast(x), 2), round(contrast(x), 1)
    return out


# name -> FastSampler options; DDIM-50 on leading steps, as diffusers' DDIMPipeline
SAMPLERS = {"ddim50_rederived": dict(method="ddim", steps=50, spacing="leading", use_clipped_model_output=True),
            "ddim50_network_eps": dict(method="ddim", steps=50, spacing="leading", use_clipped_model_output=False),
            "default": dict(method=DEFAULT_METHOD)}


def sample_all(model, diffusion, n: int, size: int, seed: int) -> dict[str, torch.Tensor]:
    from ddpm_fast import FastSampler

    # fp32, as the committed figures were sampled
    return {name: FastSampler(model, diffusion, dtype=torch.float32, **kw).sample(
        n, size, generator=torch.Generator().manual_seed(seed)) for name, kw in SAMPLERS.items()}


def run_ours(data: Path, args, changes: dict) -> dict:
    from ddpm_fast.training.config import TrainConfig
    from ddpm_fast.training.loop import fit
    from ddpm_fast.training.run import build_run

    with tempfile.TemporaryDirectory() as out:
        # --channels 3: the cast of an RGB model of grey data is what is measured (auto would train 1 channel)
        cfg = TrainConfig(data=str(data), preset="tiny", channels="3", batch_size=args.batch_size, steps=args.steps,
                          lr=args.lr, seed=args.seed, out=out, workers=0, sample_every=10**9, save_every=10**9,
                          **changes)
        run = build_run(cfg)
        fit(run)
        return measure(sample_all(run.ema.model, run.diffusion, args.samples, 32, args.seed))


def run_diffusers(data: Path, args) -> dict:
    """The plain diffusers loop (benchmarks/diffusers_loop.py) on the same data and batches."""
    from ddpm_fast import GaussianDiffusion
    from ddpm_fast.data import build_loader

    from .diffusers_loop import DiffusersLoop

    peer = DiffusersLoop("tiny", lr=args.lr, steps=args.steps, seed=args.seed)
    loader = build_loader(str(data), 32, args.batch_size, seed=args.seed, num_workers=0)
    for x0 in itertools.islice(forever(loader), args.steps):
        peer.step(x0)
    return measure(sample_all(peer.ema_unet(), GaussianDiffusion(), args.samples, 32, args.seed))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.colour_cast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=positive_int, default=1100)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--samples", type=positive_int, default=256)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--changes", default=",".join(CHANGES), help=f"of {', '.join(CHANGES)}")
    p.add_argument("--no-diffusers", action="store_true", help="skip the diffusers loop")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ddpm_fast_grey")
    args = p.parse_args(argv)
    # a plain string, not comma_choices: `--changes ""` (the defaults alone) is a documented run
    bad = [c for c in args.changes.split(",") if c and c not in CHANGES]
    if bad:
        p.error(f"--changes: unknown change(s) {', '.join(bad)} (of {', '.join(CHANGES)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    data = grey_folder(args.workdir)
    real = load_images(str(data), 32)  # the data's own row: cast 0, and the contrast to compare with
    rows = [{"run": "the data (test split)"} | measure(dict.fromkeys(SAMPLERS, real))]
    env = vars(args) | {"workdir": str(args.workdir)}

    def record(name: str, fn) -> None:
        t0 = time.perf_counter()
        rows.append({"run": name} | fn() | {"s": round(time.perf_counter() - t0, 1)})
        print(f"{name:24} " + " ".join(f"{k} {v}" for k, v in rows[-1].items() if k != "run"), flush=True)
        write_result("colour_cast", {"env": env, "runs": rows})

    if not args.no_diffusers:
        record("diffusers", lambda: run_diffusers(data, args))
    record("ddpm-fast", lambda: run_ours(data, args, {}))
    for name in (c for c in args.changes.split(",") if c):
        record(f"ddpm-fast + {name}", lambda: run_ours(data, args, CHANGES[name]))
    cols = [f"{k}_{s}" for s in SAMPLERS for k in ("cast", "contrast")]
    table = md_table(["run", *(f"{k} {s}" for s in SAMPLERS for k in ("cast", "contrast"))],
                     [[r["run"], *(f"{r[c]}" for c in cols)] for r in rows])
    path = write_result("colour_cast", {"env": env, "runs": rows})
    path.with_suffix(".md").write_text(
        f"{args.steps} steps at batch {args.batch_size}, lr {args.lr}, seed {args.seed}; {args.samples} samples of "
        f"the EMA model each way; cast = mean |channel - grey| and contrast = pixel std, both in 0..255.\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
