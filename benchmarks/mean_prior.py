"""python -m benchmarks.mean_prior --ckpt RUN [--ckpt RUN ...]: the grey-tint fixes' colour price with
nothing learnt: an eps model's per-channel output means replaced, at every evaluation, by the exact
posterior of a Gaussian prior on the images' channel means; and the sampler's own reading of them
with that prior (FastSampler's mean_prior, ddpm_fast/channel_means.py).

The tint's cause (benchmarks/RESULTS.md, "The cause, pinned"): one-channel GroupNorm groups hide x_t's
per-channel means from the network, so its x0 reading keeps them as if they were image, a flat prior
on the means, and the SDE's fresh noise piles them up. With the images' per-channel means m0 taken as
N(mu, Sigma) (the train split's) and x_t's as m_t = alpha m0 + sigma n, n ~ N(0, I / pixels), the best
reading of the means is E[m0 | m_t] = mu + alpha Sigma (alpha^2 Sigma + sigma^2 / pixels I)^-1
(m_t - alpha mu); here it is computed, not trained (as --mean-skip trains it), on the weights of a
plain model, so a colour price it pays is the means' own and not the training's. Modes: "none" (the
model as it is, the plain update), "all" (every channel's mean of the network's x0 replaced),
"chroma" (only the means less their grey: the part a grey image has none of; the brightness stays
the network's), "prior" (the sampler's reading, --mean-prior: the means of the clipped x0 replaced).
The prior is the one train records (the run's, else estimated as train does from its data).

Each run's EMA model draws --samples with the default sampler from one seed (the run's own, as the
ablation's evaluation does) per mode; KID against --split (as the ablation: at most twice --samples
reference images) when --kid, and benchmarks.colour_stats' figures of the samples and of the split.
Writes mean_prior.json and .md to $OUT when set, else benchmarks/results/."""
from __future__ import annotations

import argparse

import torch

from ddpm_fast import FastSampler
from ddpm_fast.argtypes import number, seed_int
from ddpm_fast.channel_means import SAMPLE_IMAGES, ChannelMeans
from ddpm_fast.checkpoint import load_model
from ddpm_fast.data import load_images, load_sample
from ddpm_fast.evaluation import generate, score_samples

from .colour_stats import figures, write_report
from .common import write_result

MODES = ("none", "all", "chroma", "prior")


class MeanPrior(torch.nn.Module):
    """model(x, t) with its output's per-channel means those whose x0 reading is the prior's
    E[m0 | m_t] (ChannelMeans.reading), on the network's x0 (before the sampler's clip)."""

    def __init__(self, model, diffusion, prior: ChannelMeans, mode: str = "all"):
        super().__init__()
        if diffusion.prediction != "epsilon":
            raise ValueError(f"the mean prior reads an eps model's output; this one predicts {diffusion.prediction}")
        if mode not in ("all", "chroma"):
            raise ValueError(f"mode must be all or chroma, got {mode!r}")
        self.model, self.mode, self.prior = model, mode, prior
        self.alphas_cumprod = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float64)

    def forward(self, x: torch.Tensor, t: torch.Tensor, *args) -> torch.Tensor:
        if t.is_floating_point():
            raise ValueError("the mean prior needs the discrete schedule's step indices")
        eps = self.model(x, t, *args)
        abar = self.alphas_cumprod.to(x.device)[t.long()]
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        m_t = x.double().mean((2, 3))
        gain, offset = (r.to(x.device) for r in self.prior.reading(alpha.tolist(), sigma.tolist(),
                                                                    x.shape[-2] * x.shape[-1]))
        m0 = offset + (gain @ m_t[..., None])[..., 0]
        shift = (m_t - alpha[:, None] * m0) / sigma[:, None] - eps.double().mean((2, 3))
        if self.mode == "chroma":
            shift = shift - shift.mean(1, keepdim=True)
        return eps + shift.to(eps.dtype)[..., None, None]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mean_prior", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, help="a run of an eps model; repeat for more")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    # at least 2: KID compares sets of 2 or more, and the colour spread is a standard deviation over them
    p.add_argument("--samples", type=number(int, 2), default=256)
    p.add_argument("--kid", action=argparse.BooleanOptionalAction, default=True, help="KID of the samples (Inception)")
    p.add_argument("--split", default="val", choices=("train", "val", "test"), help="KID's and the figures' split")
    p.add_argument("--seed", type=seed_int, default=None, help="the samples' seed (default: each run's own)")
    args = p.parse_args(argv)
    if any(m not in MODES for m in args.modes.split(",")):
        p.error(f"--modes: each of {', '.join(MODES)}, got {args.modes!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    modes = args.modes.split(",")
    result = {"env": vars(args), "data": {}, "runs": {}}
    for ckpt in args.ckpt:
        model, diffusion, cfg = load_model(ckpt)
        size, channels, data = cfg["model"]["image_size"], cfg["model"].get("in_ch", 3), cfg["data"]
        name = data or "the embedded set"
        if name not in result["data"]:
            result["data"][name] = figures(load_images(data, size, split=args.split, channels=channels))
        prior = diffusion.channel_means or ChannelMeans.of(
            load_sample(data, size, SAMPLE_IMAGES, seed=cfg.get("seed", 0), channels=channels))
        diffusion.channel_means = prior
        seed = cfg.get("seed", 0) if args.seed is None else args.seed
        for mode in modes:
            net = MeanPrior(model, diffusion, prior, mode) if mode in ("all", "chroma") else model
            sampler = FastSampler(net, diffusion, channels=channels, mean_prior=mode == "prior",
                                  dtype=torch.float32)  # as the committed figures were sampled
            samples = generate(sampler, args.samples, size, torch.device("cpu"), seed)
            row = figures(samples) | {"data": name, "seed": seed}
            if args.kid:
                r = score_samples(samples, data, size, torch.device("cpu"), kid_n=args.samples, seed=seed,
                                  splits=(args.split,), ref_limit=2 * args.samples)
                row["kid"] = round(r[f"kid_{args.split}"], 5)
            result["runs"][f"{ckpt}: {mode}"] = row
            print(ckpt, mode, row, flush=True)
            write_result("mean_prior", result)
    write_report("mean_prior", result, args.split, "run: mode", ("kid",) if args.kid else ())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
