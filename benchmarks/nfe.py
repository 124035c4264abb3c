"""python -m benchmarks.nfe --ckpt RUN: sample quality against model evaluations (NFE), every solver.

Each solver samples the same x_T at each NFE of the grid; a grid point a solver cannot take is left
out (Heun evaluates 2 steps - 1 times, so it takes odd NFEs; a spacing has at most so many distinct
noise levels). Quality is KID, and FID from evaluation.FID_MIN_SAMPLES images on, against the test
split's Inception features (metrics.reference_stats caches them beside the data). The yardstick is
DDPM over every training step from two seeds: a solver "reaches DDPM" at the first NFE whose KID is
no worse than the worse of the two seeds (within their spread). With --seeds, every solver cell is
sampled from each seed's x_T and chain noise, and a cell's KID is the mean over them (its spread:
the range).

Writes nfe.json (after every run: a timeout keeps what finished, and --resume takes those rows back
instead of sampling them again, the DDPM yardstick included), nfe.md (KID x 1e3, and FID, a row per
solver, a column per NFE) and nfe.png (KID against NFE) to $OUT when set, else benchmarks/results/, and
prints the first NFE at which each solver, and which solver first, reaches DDPM. A solver is
METHOD[:SPACING[:ORDER[:SIGMA_MIN[:SIGMA_MAX]]]] (unipc's order; the Karras spacing's lowest and
highest sigma). Inception costs ~0.3 s an image on a CPU core: cut the grid with --images, --solvers
and --nfe.

    python -m benchmarks.nfe --ckpt runs/anime64 --images 2048
    python -m benchmarks.nfe --ckpt runs/anime64 --solvers dpmpp_2m:karras,unipc:trailing:3 --nfe 5,10,20
    python -m benchmarks.nfe --ckpt runs/anime64 --solvers dpmpp_2m_sde:karras,dpmpp_2m_sde:karras::0.1:157.4 --nfe 20
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ddpm_fast import metrics
from ddpm_fast.argtypes import int_tuple, number, positive_int
from ddpm_fast.data import load_images
from ddpm_fast.evaluation import FID_MIN_SAMPLES
from ddpm_fast.plan import KERNELS, ExecutionPlan, resolve_device
from ddpm_fast.sampling import METHODS, FastSampler
from ddpm_fast.checkpoint import load_model

from .common import result_path, write_result
from .report_parts import md_table

NFE_GRID = (5, 10, 15, 20, 25, 50, 100, 250, 1000)
YARDSTICK_SEEDS = (0, 1)


def parse_solver(spec: str) -> dict:
    method, spacing, order, sigma_min, sigma_max = (spec.split(":") + [None] * 4)[:5]
    return {"solver": spec, "method": method, "spacing": spacing or None, "order": int(order) if order else None,
            "sigma_min": float(sigma_min) if sigma_min else None, "sigma_max": float(sigma_max) if sigma_max else None}


def steps_for(method: str, nfe: int) -> int | None:
    """diffusers' num_inference_steps that makes `nfe` evaluations (None: none does)."""
    if method != "heun":
        return nfe
    return (nfe + 1) // 2 if nfe % 2 else None


def cells(rows: list[dict], key: str = "kid") -> dict[tuple[str, int], list[float]]:
    """{(solver, NFE): the values of `key` over the seeds measured}. DDPM over every step is its
    yardstick's seed 0 (the other seed sets the bar only)."""
    out: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        if key in r and not (r.get("yardstick") and r["seed"] != 0):
            out.setdefault((r["solver"], r["nfe"]), []).append(r[key])
    return out


def reaches(rows: list[dict]) -> dict:
    """The yardstick (the worse KID of DDPM's seeds) and, per solver, the first NFE whose KID, the mean
    over its seeds, reaches it; `first` the solver with the fewest evaluations there (then the lower KID)."""
    ddpm = [r["kid"] for r in rows if r.get("yardstick")]
    if len(ddpm) < len(YARDSTICK_SEEDS):
        return {}
    bar = max(ddpm)
    firsts = {}
    for (solver, nfe), kids in sorted(cells(rows).items(), key=lambda kv: kv[0][1]):
        kid = statistics.fmean(kids)
        if kid <= bar and solver not in firsts:
            firsts[solver] = {"nfe": nfe, "kid": kid}
    first = min(firsts.items(), key=lambda kv: (kv[1]["nfe"], kv[1]["kid"]), default=None)
    return {"ddpm_kid": ddpm, "bar": bar, "spread": bar - min(ddpm), "first_nfe": firsts,
            "first": {"solver": first[0], **first[1]} if first else None}


def _cell(values: list[float], scale: float) -> str:
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ({min(values) * scale:.2f}-{max(values) * scale:.2f})"


def markdown(rows: list[dict], verdict: dict) -> str:
    kids = cells(rows)
    grid = sorted({n for _, n in kids})
    solvers = list(dict.fromkeys(s for s, _ in kids))
    seeds = max((len(v) for v in kids.values()), default=1)
    out = []
    for key, title, scale in (("kid", "KID x 1e3", 1e3), ("fid", "FID", 1.0)):
        text = {k: _cell(v, scale) for k, v in cells(rows, key).items()}
        if not text:
            continue
        over = f"; the mean over {seeds} seeds (their range)" if seeds > 1 else ""
        out += [f"{title} against NFE (test split; lower is better{over})", "",
                md_table(["solver", *grid], [[s, *(text.get((s, n), "") for n in grid)] for s in solvers]), ""]
    if verdict:
        ddpm = ", ".join(f"{k * 1e3:.2f}" for k in verdict["ddpm_kid"])
        out.append(f"DDPM over every step, seeds {YARDSTICK_SEEDS}: KID x 1e3 {ddpm} "
                   f"(spread {verdict['spread'] * 1e3:.2f}).")
        first = verdict["first"]
        out.append(f"First to reach it: {first['solver']} at NFE {first['nfe']}." if first else "No solver reaches it.")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], verdict: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    kids = cells([r for r in rows if not r.get("yardstick")])  # the yardstick is the band
    for i, solver in enumerate(dict.fromkeys(s for s, _ in kids)):  # tab20: a colour each for up to 20 solvers
        pts = sorted((n, statistics.fmean(v), min(v), max(v)) for (s, n), v in kids.items() if s == solver)
        nfe, mean, lo, hi = zip(*pts)
        spread = [[m - a for m, a in zip(mean, lo)], [b - m for m, b in zip(mean, hi)]]  # the seeds' range
        ax.errorbar(nfe, mean, yerr=spread, marker="o", label=solver, color=plt.cm.tab20(i % 20), capsize=2)
    if verdict:
        ax.axhspan(min(verdict["ddpm_kid"]), verdict["bar"], color="grey", alpha=0.3, label="DDPM, 2 seeds")
        ax.axhline(verdict["bar"], color="grey", lw=0.8)
    ax.set(xscale="log", xlabel="model evaluations (NFE)", ylabel="KID (test split)", title="Quality against NFE")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def earlier_rows(env: dict) -> list[dict]:
    """The rows of the nfe.json this benchmark wrote before, when it measured the same thing."""
    path = result_path("nfe")
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    same = ("checkpoint", "images", "ref_images", "timesteps", "clip_x0", "use_clipped_model_output", "mean_prior")
    if any(old["env"].get(k) != env[k] for k in same):
        raise SystemExit(f"--resume: {path} measured another setting ({', '.join(same)} differ); move it away")
    print(f"--resume: {len(old['rows'])} rows from {path}")
    return old["rows"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.nfe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run folder or checkpoint file")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True)
    # at least 2 (the reference's too): KID compares sets of 2 or more
    p.add_argument("--images", type=number(int, 2), default=1000, help="samples per (solver, NFE, seed)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds of each solver cell's x_T and chain noise "
                                                "(the cell: their mean KID)")
    p.add_argument("--solvers", default=",".join(METHODS),
                   help="comma-separated METHOD[:SPACING[:ORDER[:SIGMA_MIN[:SIGMA_MAX]]]]")
    p.add_argument("--nfe", type=int_tuple, default=",".join(map(str, NFE_GRID)), help="comma-separated NFEs")
    p.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--use-clipped-model-output", action=argparse.BooleanOptionalAction,
                   help="with --clip-x0, re-derive eps from the clipped x0, or keep the network's "
                        "(default: each solver's; schedulers.Scheduler)")
    p.add_argument("--mean-prior", action=argparse.BooleanOptionalAction,
                   help="read x0's channel means with the run's prior on them (default: the sampler's default)")
    p.add_argument("--data", help="image folder (default: the run's data)")
    p.add_argument("--ref-images", type=number(int, 2), default=10000,
                   help="at most this many test images for the reference")
    p.add_argument("--batch-size", type=positive_int, default=500)
    p.add_argument("--device", default="auto")
    p.add_argument("--fast", action="store_true", help="bf16 autocast and channels_last (CUDA graphs are on on a GPU)")
    p.add_argument("--kernels", default="auto", choices=KERNELS)
    p.add_argument("--yardstick", action=argparse.BooleanOptionalAction, default=True,
                   help="sample DDPM over every step from two seeds, the bar the solvers are read against "
                        "(--no-yardstick: the solvers' cells alone, to set beside another model's table)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of an earlier nfe.json of this checkpoint, --images and clip options")
    args = p.parse_args(argv)
    try:
        args.seeds = list(dict.fromkeys(int(s) for s in args.seeds.split(",")))
    except ValueError:
        p.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if not args.nfe or min(args.nfe) < 1:
        p.error(f"--nfe: give one or more evaluation counts >= 1, like 5,10,20; got {args.nfe}")
    try:  # here, not after the model and the reference are loaded
        for spec in args.solvers.split(","):
            parse_solver(spec)
    except ValueError:
        p.error(f"--solvers: {spec!r} is not METHOD[:SPACING[:ORDER[:SIGMA_MIN[:SIGMA_MAX]]]] (ORDER an "
                "integer, SIGMA_MIN and SIGMA_MAX numbers)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    seeds = args.seeds

    device = resolve_device(args.device)  # graphs change speed, not the samples: on on a GPU
    plan = ExecutionPlan.resolve(device, fast=args.fast, kernels=args.kernels, cuda_graphs=device.type == "cuda")
    model, diffusion, cfg = load_model(args.ckpt, ema=args.ema, device=plan.device)
    model = plan.prepare(model)
    size, T = cfg["model"]["image_size"], diffusion.timesteps
    data = args.data if args.data is not None else cfg.get("data")
    ref = metrics.reference_stats(data, size, "test", load_images, limit=args.ref_images, device=plan.device)
    channels = cfg["model"].get("in_ch", 3)
    x_T = {s: torch.randn(args.images, channels, size, size, generator=torch.Generator().manual_seed(s))
           for s in sorted(set(YARDSTICK_SEEDS) | set(seeds))}
    runs = [{"solver": "ddpm", "method": "ddpm", "spacing": None, "order": None, "sigma_min": None, "sigma_max": None,
             "nfe": T, "seed": s, "yardstick": True} for s in YARDSTICK_SEEDS if args.yardstick]
    for spec in args.solvers.split(","):
        for nfe in args.nfe:
            for seed in seeds:
                run = {**parse_solver(spec), "nfe": nfe, "seed": seed}
                if not (run["method"] == "ddpm" and nfe == T and run["spacing"] is None):  # the yardstick
                    runs.append(run)

    env = {"device": str(plan.device), "plan": plan.describe(), "checkpoint": str(args.ckpt), "images": args.images,
           "ref_images": len(ref.features), "timesteps": T, "clip_x0": args.clip_x0,
           "use_clipped_model_output": args.use_clipped_model_output, "mean_prior": args.mean_prior}
    rows = earlier_rows(env) if args.resume else []
    done = {(r["solver"], r["nfe"], r["seed"]) for r in rows}
    path = write_result("nfe", {"env": env, "rows": rows, "reaches": reaches(rows)})
    for run in (r for r in runs if (r["solver"], r["nfe"], r["seed"]) not in done):
        steps = steps_for(run["method"], run["nfe"])
        try:
            if steps is None:
                raise ValueError(f"no step count gives {run['nfe']} evaluations")
            sampler = FastSampler(model, diffusion, method=run["method"], steps=steps, spacing=run["spacing"],
                                  order=run["order"], sigma_min=run["sigma_min"], sigma_max=run["sigma_max"],
                                  clip_x0=args.clip_x0, use_clipped_model_output=args.use_clipped_model_output,
                                  mean_prior=args.mean_prior, plan=plan)
        except ValueError as e:
            print(f"skip {run['solver']} at NFE {run['nfe']}: {e}")
            continue
        t0 = time.perf_counter()
        torch.manual_seed(run["seed"])  # the chain's noise (graph replays draw from the default generator)
        samples = torch.cat([sampler.sample(len(x), size, x_T=x).cpu()
                             for x in x_T[run["seed"]].split(args.batch_size)])
        feats = metrics.inception_features(samples, device=plan.device)
        kid, kid_std = metrics.kid(ref.features, feats, subsets=100,
                                   subset_size=min(1000, len(feats), len(ref.features)))
        row = {**run, "steps": steps, "kid": kid, "kid_std": kid_std, "seconds": round(time.perf_counter() - t0, 1)}
        if len(feats) >= FID_MIN_SAMPLES:
            row["fid"] = metrics.fid_from_stats(ref.mu, ref.sigma, *metrics.mean_cov(feats))
        rows.append(row)
        print(f"{run['solver']:>22} NFE {run['nfe']:>4} seed {run['seed']}: KID {kid * 1e3:.2f}e-3"
              + (f", FID {row['fid']:.2f}" if "fid" in row else ""))
        path = write_result("nfe", {"env": env, "rows": rows, "reaches": reaches(rows)})

    verdict = reaches(rows)
    path.with_suffix(".md").write_text(markdown(rows, verdict))
    plot(rows, verdict, path.with_suffix(".png"))
    for solver, first in verdict.get("first_nfe", {}).items():
        print(f"{solver} reaches DDPM-{T} at NFE {first['nfe']}")
    first = verdict.get("first")
    print(f"first to reach DDPM-{T} (KID <= {verdict['bar'] * 1e3:.2f}e-3): "
          + (f"{first['solver']} at NFE {first['nfe']}" if first else "none") if verdict else "no yardstick")
    print(f"wrote {path}, {path.with_suffix('.md')}, {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
