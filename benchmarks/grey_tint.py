"""python -m benchmarks.grey_tint --ckpt RUN [--ckpt RUN ...]: where does an RGB model of grey data
(R = G = B in every training pixel) get the per-sample tint its samples show?

For each run (a checkpoint of `train --channels 3` on a grey folder; its EMA weights):

- x0 against t: held-out grey images noised to step t (one seeded draw), the colour of the
  model's x0 prediction (clamped to [-1, 1], as the samplers read it) at each t;
- the default sampler (dpmpp_2m_sde, Karras, 20) with one part changed at a time, every chain
  from the same x_T and the same injected noise: its colour means from the ODE's step
  (--chroma-ode), x_T's per-channel means (its lowest frequency)
  made equal across the channels, the same for the SDE's injected noise, the x0 prediction
  projected onto grey (the channel mean) at the first k evaluations, the clip's other reading
  (use_clipped_model_output=True), no clip, another spacing; and the ODE (dpmpp_2m) and the
  reference samplers beside it: DDIM-50 on leading steps with either reading (diffusers' DDIMPipeline keeps the network's
  eps) and DDPM-1000 (Ho et al.'s clipped ancestral sampler).

The default sampler reads x0's channel means with the run's recorded prior on them where its
default turns that on (ddpm_fast/channel_means.py); every other row is the plain update (the prior
off, as diffusers' samplers are), with the plain default sampler's own row beside it.

The figures: cast = mean |channel - grey| over pixels in 0..255 (grey = the channel mean), hue =
the same of each image's per-channel means (the uniform per-sample tint), contrast = the pixel
std in 0..255 (a washed-out sample is grey too). Writes grey_tint.json and .md to $OUT when set,
else benchmarks/results/."""
from __future__ import annotations

import argparse

import torch

from ddpm_fast import FastSampler
from ddpm_fast.argtypes import positive_int, seed_int
from ddpm_fast.data import load_images
from ddpm_fast.schedulers import DEFAULT_METHOD, DEFAULT_SPACING
from ddpm_fast.checkpoint import load_model

from .common import write_result
from .report_parts import md_table

T_GRID = (0, 10, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 950, 999)


def cast(images: torch.Tensor) -> float:
    """Mean |channel - grey| in 0..255 of (N, 3, H, W) images in [-1, 1]."""
    x = (images.clamp(-1, 1) + 1) * 127.5
    return float((x - x.mean(1, keepdim=True)).abs().mean())


def hue(images: torch.Tensor) -> float:
    """cast of each image's per-channel mean: the uniform tint of a sample."""
    return cast(images.clamp(-1, 1).mean((2, 3), keepdim=True))


def contrast(images: torch.Tensor) -> float:
    return float(((images.clamp(-1, 1) + 1) * 127.5).std())


def figures(images: torch.Tensor) -> dict:
    return {"cast": round(cast(images), 2), "hue": round(hue(images), 2), "contrast": round(contrast(images), 1)}


def dc_grey(z: torch.Tensor) -> torch.Tensor:
    """z with each image's per-channel means replaced by their mean over the channels."""
    m = z.mean((2, 3), keepdim=True)
    return z - m + m.mean(1, keepdim=True)


@torch.no_grad()
def x0_against_t(model, diffusion, images: torch.Tensor, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=gen)
    rows = []
    for t in (t for t in T_GRID if t < diffusion.timesteps):  # a short schedule: its steps only
        tt = torch.full((images.shape[0],), t, dtype=torch.long)
        x_t = diffusion.q_sample(images, tt, noise)
        x0 = diffusion.predict_x0(x_t, diffusion.alphas_cumprod[tt].float(), model(x_t, diffusion.model_time(tt)))
        rows.append({"t": t, **figures(x0)})
    return rows


@torch.no_grad()
def chain(model, diffusion, n: int, size: int, seed: int, *, method: str = DEFAULT_METHOD, steps: int = 20,
          spacing: str | None = None, grey_x0: int = 0, grey_xT: bool = False, grey_noise: bool = False,
          **options) -> torch.Tensor:
    """n samples of FastSampler's scheduler stepped by hand, so that its x_T, its injected noise
    and its x0 predictions can be changed: x_T and every step's noise from one seeded generator
    (the same draws for every variant of a method), the x0 prediction projected onto grey at the
    first `grey_x0` evaluations, the per-channel means of x_T / of the noise made grey."""
    sched = FastSampler(model, diffusion, method=method, steps=steps, spacing=spacing, cuda_graph=False,
                        **options).scheduler
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=gen)
    x = dc_grey(x) if grey_xT else x
    sched.begin(x)
    for e in range(sched.num_evaluations):
        out = model(x, sched.model_time(n))
        if e < grey_x0:  # the row's own x0 read-out (x0 = c1 x - c2 out), projected, and the output that gives it
            c1, c2, _ = sched._x0_coefs[e].tolist()
            x0 = c1 * x - c2 * out
            out = (c1 * x - x0.mean(1, keepdim=True)) / c2
        z = torch.randn(x.shape, generator=gen)
        x = sched.step(out, x, noise=dc_grey(z) if grey_noise else z)
    return x.clamp(-1, 1)


BRIEF = (f"{DEFAULT_METHOD}, {DEFAULT_SPACING[DEFAULT_METHOD]}, 20 (default)", "  the plain update (--no-mean-prior)",
         "  colour means from the ODE's step (--chroma-ode)", "dpmpp_2m, karras, 20, network eps (the ODE)",
         "ddim, leading, 50, network eps (DDIMPipeline)")


def variants(evals: int) -> dict[str, dict]:
    """The default sampler (diffusers' update), the same with one part changed, the ODE of the same
    solver, and the reference samplers."""
    out = {BRIEF[0]: {}, "  the plain update (--no-mean-prior)": {},
           "  colour means from the ODE's step (--chroma-ode)": dict(chroma_ode=True),
           "  x_T per-channel means grey": dict(grey_xT=True),
           "  injected noise per-channel means grey": dict(grey_noise=True),
           "  both": dict(grey_xT=True, grey_noise=True)}
    for k in (1, 2, 4, 8, 12, 16):
        if k < evals:
            out[f"  x0 projected to grey at the first {k} of {evals}"] = dict(grey_x0=k)
    out |= {"  eps re-derived from the clipped x0 (use_clipped_model_output)":
            dict(use_clipped_model_output=True),
            "  no clip": dict(clip_x0=False),
            "  linspace spacing": dict(spacing="linspace"),
            "dpmpp_2m, karras, 20, network eps (the ODE)": dict(method="dpmpp_2m", spacing="karras",
                                                                use_clipped_model_output=False),
            "ddim, leading, 50, network eps (DDIMPipeline)": dict(method="ddim", steps=50, spacing="leading",
                                                                  use_clipped_model_output=False),
            "ddim, leading, 50, eps re-derived": dict(method="ddim", steps=50, spacing="leading",
                                                      use_clipped_model_output=True),
            "ddpm, 1000": dict(method="ddpm", steps=None)}
    return {k: v if k == BRIEF[0] else v | {"mean_prior": False} for k, v in out.items()}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.grey_tint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, help="a run trained with --channels 3 on grey data")
    p.add_argument("--samples", type=positive_int, default=64)
    p.add_argument("--images", type=positive_int, default=64, help="held-out images for x0 against t")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--no-ddpm", action="store_true", help="skip DDPM-1000 (1,000 evaluations)")
    p.add_argument("--brief", action="store_true", help="only the default sampler, with --chroma-ode, the ODE and "
                                                        "DDIMPipeline's reading (no parts changed, no DDPM-1000)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    result = {"env": vars(args), "runs": []}
    md = []
    for ckpt in args.ckpt:
        model, diffusion, cfg = load_model(ckpt)
        size = cfg["model"]["image_size"]
        held_out = load_images(cfg["data"], size, split="test", limit=args.images)
        run = {"ckpt": ckpt, "step_of": cfg.get("steps"), "prediction": diffusion.prediction,
               "data": figures(held_out), "x0_against_t": x0_against_t(model, diffusion, held_out, args.seed),
               "samplers": {}}
        evals = FastSampler(model, diffusion, method=DEFAULT_METHOD, steps=20).num_evaluations
        for name, kw in variants(evals).items():
            if (args.no_ddpm or args.brief) and kw.get("method") == "ddpm":
                continue
            if args.brief and name not in BRIEF:
                continue
            run["samplers"][name] = figures(chain(model, diffusion, args.samples, size, args.seed, **kw))
            print(ckpt, name, run["samplers"][name], flush=True)
        result["runs"].append(run)
        write_result("grey_tint", result)
        md += [f"### {ckpt} ({diffusion.prediction}, {cfg.get('steps')} steps)\n",
               md_table(["t", "x0 cast", "x0 hue", "x0 contrast"],
                        [[r["t"], r["cast"], r["hue"], r["contrast"]] for r in run["x0_against_t"]]), "",
               md_table(["sampler", "cast", "hue", "contrast"],
                        [["the data (test split)", *run["data"].values()]]
                        + [[k, *v.values()] for k, v in run["samplers"].items()]), ""]
    path = write_result("grey_tint", result)
    path.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
