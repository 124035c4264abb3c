"""python -m benchmarks.bpd_estimate --ckpt RUN[,RUN...]: how well evaluate's bits/dim estimate
(evaluation.t_strata: t_samples model calls per image) matches the exact sum over every t, and what
bf16 autocast moves.

For each run, every term L_t (t = 0..T-1) of the same held-out images is computed once with one
noise draw per (t, image), in fp32 and again under the plan's bf16 autocast on the same noise. From
those terms, with the noise held fixed: the exact sum; its standard error over the images (the
spread that the noise draws and the choice of images give every estimate, the exact one too); the
stratified estimate at each --k, re-drawn --draws times, whose spread is what sampling t adds; and
the evenly spaced grid scaled by (T-1)/k that evaluate used before (biased: the terms fall steeply
with t). Writes $OUT/bpd_estimate.json (else benchmarks/results/).

    python -m benchmarks.bpd_estimate --ckpt runs/default,runs/g4k_min_snr --images 64
"""
from __future__ import annotations

import argparse
import time

import torch

from ddpm_fast.argtypes import int_tuple, number, positive_int, seed_int
from ddpm_fast.checkpoint import load_model
from ddpm_fast.data import load_images
from ddpm_fast.data.hf import image_folder
from ddpm_fast.evaluation import draw_in_stratum, t_strata
from ddpm_fast.plan import ExecutionPlan

from .common import bench_env, write_result


@torch.no_grad()
def terms(model, diffusion, x0: torch.Tensor, plan: ExecutionPlan, seed: int) -> dict:
    """(T, n) float64 tables of L_t per image, fp32 and under the plan's autocast, on one noise."""
    gen = torch.Generator().manual_seed(seed)
    out = {"fp32": [], "autocast": [], "seconds": {"fp32": 0.0, "autocast": 0.0}}
    for t in range(diffusion.timesteps):
        noise = torch.randn(x0.shape, generator=gen)
        tb = torch.full((len(x0),), t, dtype=torch.long)
        for key, ctx in (("fp32", torch.autocast("cpu", enabled=False)), ("autocast", plan.autocast())):
            start = time.perf_counter()
            with ctx:
                out[key].append(diffusion.vb_terms_bpd(model, x0, tb, "posterior", noise).double())
            out["seconds"][key] += time.perf_counter() - start
    return {"fp32": torch.stack(out["fp32"]), "autocast": torch.stack(out["autocast"]),
            "seconds": {k: round(v, 1) for k, v in out["seconds"].items()}}


def stratified(L: torch.Tensor, k: int, draws: int, seed: int) -> torch.Tensor:
    """`draws` stratified estimates of the mean over images of sum_{t>=1} L_t (L: the (T, n) table,
    row t the term L_t), each image drawing one t a stratum as evaluation.bits_per_dim does."""
    T, n = L.shape
    strata = t_strata(k, T)
    gen = torch.Generator().manual_seed(seed)
    est = []
    for _ in range(draws):
        per_image = sum((hi - lo) * L[draw_in_stratum(lo, hi, n, gen), torch.arange(n)] for lo, hi in strata)
        est.append(per_image.mean())
    return torch.stack(est)


def evenly_spaced(L: torch.Tensor, k: int) -> float:
    """The estimate evaluate made before t_strata: k evenly spaced t, scaled by (T-1)/k."""
    T = L.shape[0]
    ts = torch.linspace(1, T - 1, k).round().long()
    return (L[ts].mean(1).sum() * (T - 1) / k).item()


def measure(ckpt: str, images: int, ks: tuple[int, ...], draws: int, seed: int) -> dict:
    plan = ExecutionPlan.resolve("cpu", fast=True)
    model, diffusion, cfg = load_model(ckpt, ema=True, device=plan.device)
    model = plan.prepare(model).eval()
    data = image_folder(cfg.get("data"), cfg.get("image_column", "image"))
    x0 = load_images(data, cfg["model"]["image_size"], split="test", limit=images)
    tables = terms(model, diffusion, x0, plan, seed)
    prior = diffusion.prior_bpd(x0).double()
    row = {"ckpt": ckpt, "images": len(x0), "timesteps": diffusion.timesteps, "plan": plan.describe(),
           "seconds_every_t": tables["seconds"]}
    for key in ("fp32", "autocast"):
        L = tables[key]
        per_image = L.sum(0) + prior
        exact_kl = L[1:].mean(1).sum().item()
        row[key] = {"decoder": L[0].mean().item(), "kl": exact_kl, "prior": prior.mean().item(),
                    "total": per_image.mean().item(), "std_err": (per_image.std() / len(x0) ** 0.5).item(),
                    "kl_share_t_le_10": (L[1:11].mean(1).sum() / exact_kl).item()}
    row["autocast_minus_fp32"] = row["autocast"]["total"] - row["fp32"]["total"]
    row["per_t_mean"] = [round(v, 7) for v in tables["fp32"][1:].mean(1).tolist()]  # t = 1..T-1
    row["estimates"] = []
    for k in ks:
        est = stratified(tables["fp32"], k, draws, seed)
        row["estimates"].append({"k": k, "strata": len(t_strata(k, diffusion.timesteps)),
                                 "stratified_mean_minus_exact": est.mean().item() - row["fp32"]["kl"],
                                 "stratified_std": est.std().item(),
                                 "evenly_spaced_minus_exact": evenly_spaced(tables["fp32"], k) - row["fp32"]["kl"]})
    return row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bpd_estimate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, type=lambda s: tuple(v for v in s.split(",") if v),
                   help="comma-separated runs")
    p.add_argument("--images", type=positive_int, default=64, help="test images (evaluate's --bpd-images)")
    p.add_argument("--k", type=int_tuple, default=(25, 50, 100, 200), help="t_samples to try")
    p.add_argument("--draws", type=number(int, 2), default=300, help="re-draws of t per estimate (their spread)")
    p.add_argument("--seed", type=seed_int, default=0)
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if not args.ckpt:
        p.error("--ckpt: give one or more runs, comma-separated")
    if not args.k or min(args.k) < 1:
        p.error(f"--k: give one or more t_samples >= 1, like 50,100; got {args.k}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    rows = []
    for ckpt in args.ckpt:
        rows.append(measure(ckpt, args.images, args.k, args.draws, args.seed))
        r = rows[-1]
        print(f"{ckpt}: exact {r['fp32']['total']:.4f} ± {r['fp32']['std_err']:.4f} bits/dim, autocast "
              f"{r['autocast_minus_fp32']:+.4f}; " + ", ".join(
                  f"k={e['k']}: ±{e['stratified_std']:.4f} (grid {e['evenly_spaced_minus_exact']:+.2f})"
                  for e in r["estimates"]))
        write_result("bpd_estimate", {"env": bench_env(images=args.images, draws=args.draws, seed=args.seed),
                                      "runs": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
