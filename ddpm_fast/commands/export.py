"""python -m ddpm_fast.export: a run as a diffusers DDPMPipeline folder, or its model alone as a
.safetensors file; every --ckpt (sample, evaluate, export) loads both back.

    python -m ddpm_fast.export --ckpt runs/default --out ddpm-pipeline/
    python -m ddpm_fast.export --ckpt runs/default --out ddpm-pipeline/ --scheduler dpmpp_2m
    python -m ddpm_fast.export --ckpt runs/default --out ddpm-sde/ --scheduler dpmpp_2m_sde --use-clipped-model-output
    python -m ddpm_fast.export --ckpt runs/default --safetensors model.safetensors
"""
from __future__ import annotations

import argparse

from ..argtypes import positive_float
from ..interop import SCHEDULERS, VARIANCE_TYPES
from ..schedulers import DEFAULT_CLIP_X0, SPACINGS
from .cli import run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run folder, checkpoint file (a kept one: RUN/checkpoints/"
                                                 "step_N.pt), diffusers folder or .safetensors file")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="export the EMA weights")
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", metavar="DIR", help="write a DDPMPipeline folder (unet/, scheduler/, model_index.json)")
    dest.add_argument("--safetensors", metavar="FILE", help="write the model alone, with the run's config as metadata")
    p.add_argument("--scheduler", default="ddpm", choices=tuple(SCHEDULERS), help="the folder's diffusers scheduler")
    p.add_argument("--spacing", choices=SPACINGS,
                   help="its timesteps, as ddpm-fast's sampler of that name takes them (karras: use_karras_sigmas; "
                        "default: that sampler's, Karras sigmas for dpmpp_2m_sde, else linspace)")
    p.add_argument("--sigma-min", type=positive_float,
                   help="with Karras sigmas, the lowest evaluated (diffusers' sigma_min, kept in the folder's "
                        "scheduler config; default: ddpm-fast's sampler's, sqrt(0.1 / gamma) for a min-SNR run, "
                        "else the schedule's smallest)")
    p.add_argument("--sigma-max", type=positive_float,
                   help="with Karras sigmas, the highest, where the chain starts (diffusers' sigma_max, kept in the "
                        "folder's scheduler config; default: ddpm-fast's sampler's, the schedule's largest or 80, "
                        "the smaller)")
    p.add_argument("--variance", choices=tuple(VARIANCE_TYPES),
                   help="DDPM variance: beta (fixed_large) or posterior (fixed_small); default: the run's, else beta")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out folder or an existing --safetensors file (written beside, then "
                        "swapped in: the old one stays whole should the export fail)")
    p.add_argument("--clip-x0", action=argparse.BooleanOptionalAction,
                   help="clamp x0 as the run's sampler does (default: the run's sample_clip_x0, else on)")
    p.add_argument("--use-clipped-model-output", action=argparse.BooleanOptionalAction,
                   help="beside the clipped x0, re-derive eps or (--no-...) keep the network's, as ddpm-fast's "
                        "sampler of that name (default: its default; ddim in a DDPMPipeline can only keep it)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run("ddpm_fast.export", lambda: _export(args))


def _export(args) -> None:
    from ..interop import export_pipeline, save_safetensors
    from ..checkpoint import load_model

    model, diffusion, cfg = load_model(args.ckpt, ema=args.ema)
    if args.safetensors:
        save_safetensors(model, cfg, args.safetensors, overwrite=args.overwrite)
    else:
        clip = cfg.get("sample_clip_x0", DEFAULT_CLIP_X0) if args.clip_x0 is None else args.clip_x0
        export_pipeline(model, diffusion, args.out, args.scheduler, args.variance or cfg.get("variance", "beta"), clip,
                        args.use_clipped_model_output, overwrite=args.overwrite, spacing=args.spacing,
                        sigma_min=args.sigma_min, sigma_max=args.sigma_max)
    print(f"wrote {args.safetensors or args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
