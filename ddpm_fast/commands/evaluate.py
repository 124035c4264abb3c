"""python -m ddpm_fast.evaluate: held-out eps-MSE (over t, and per quarter of t: eps_mse_q0, the
least noise, to eps_mse_q3) and bits/dim of a trained run (and FID/KID with the [eval] extra).

    python -m ddpm_fast.evaluate --ckpt runs/default
    python -m ddpm_fast.evaluate --ckpt runs/default --kid 256 --method ddim --steps 50 --json eval.json
"""
from __future__ import annotations

import argparse
import json
import math

from ..argtypes import comma_choices, non_negative_int, positive_int, seed_int
from ..files import atomic_write
from .cli import add_debug_argument, add_plan_arguments, add_sampler_arguments, plan_from_args, run, sampler_from_args


SPLITS = ("train", "val", "test")
# A tenth of the calls of T = 1000's exact sum. On three models the spread that drawing t adds is
# under a hundredth of the standard error over 64 images that the exact sum has as well
# (docs/bpd_estimate.json).
BPD_T = 100


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="run folder or checkpoint file (a kept one: RUN/checkpoints/step_N.pt)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    p.add_argument("--data", help="image folder (default: the run's data)")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--images", type=positive_int, help="evaluate on at most this many images of the split")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--mse-draws", type=positive_int, default=4, help="(t, noise) draws per image for the MSE")
    p.add_argument("--bpd-images", type=non_negative_int, default=64, help="images for bits/dim (0: skip)")
    p.add_argument("--bpd-t", type=positive_int, default=BPD_T,
                   help="model calls per image for bits/dim's sum over t >= 1: an unbiased stratified estimate "
                        "(evaluation.t_strata), within the exact sum's own spread at the default; T-1 or more: "
                        "every t, the exact sum")
    p.add_argument("--fid", type=non_negative_int, default=0, metavar="N", help="FID on N samples (needs [eval])")
    p.add_argument("--kid", type=non_negative_int, default=0, metavar="N", help="KID on N samples (needs [eval])")
    p.add_argument("--ref-images", type=positive_int, default=10000,
                   help="at most this many images of a split for its FID/KID reference statistics")
    p.add_argument("--splits", type=comma_choices(SPLITS), default=("test",),
                   help="comma-separated splits to compare samples with (checked before anything is computed)")
    add_sampler_arguments(p)
    p.add_argument("--seed", type=seed_int, default=0)
    add_plan_arguments(p)
    add_debug_argument(p)
    p.add_argument("--json", help="also write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run("ddpm_fast.evaluate", lambda: _evaluate(args), debug=args.debug)


def _evaluate(args) -> dict:
    from ..data import load_images
    from ..data.hf import image_folder
    from ..evaluation import bits_per_dim, heldout_mse
    from ..checkpoint import load_model
    from ..sampling import model_channels

    plan = plan_from_args(args)
    model, diffusion, cfg = load_model(args.ckpt, ema=args.ema, device=plan.device)
    model = plan.prepare(model)
    data = args.data if args.data is not None else cfg.get("data")
    data = image_folder(data, cfg.get("image_column", "image"))  # a dataset's images, written out once
    size = cfg["model"]["image_size"]
    images = load_images(data, size, split=args.split, limit=args.images, channels=model_channels(model))
    result = {"checkpoint": str(args.ckpt), "ema": args.ema, "split": args.split, "images": len(images),
              "plan": plan.describe()}
    # The held-out figures run on the plan, as the samples do: on three models bf16 moved bits/dim
    # by at most a fifteenth of its standard error (docs/bpd_estimate.json); --no-fast for fp32.
    with plan.autocast():
        mse = heldout_mse(model, diffusion, images, args.batch_size, args.mse_draws, args.seed)
        result["eps_mse"], result["eps_mse_std_err"] = mse.mean, mse.std_err
        result |= {f"eps_mse_q{q}": value for q, value in enumerate(mse.by_quartile)}
        result["bits_per_dim"] = None  # null in the JSON when not computed
        if args.bpd_images > 0 and diffusion.schedule != "continuous":
            result["bits_per_dim"] = bits_per_dim(model, diffusion, images[: args.bpd_images], args.batch_size,
                                                  args.bpd_t, seed=args.seed)
    if args.fid or args.kid:
        from ..evaluation import sample_quality

        sampler = sampler_from_args(model, diffusion, args, plan)
        result.update(sample_quality(sampler, data, size, plan.device, fid_n=args.fid, kid_n=args.kid,
                                     seed=args.seed, splits=args.splits,
                                     ref_limit=args.ref_images))
    text = json.dumps(finite_or_null(result), indent=2, allow_nan=False)
    print(text)
    if args.json:
        atomic_write(args.json, text + "\n")
    return result


def finite_or_null(value):
    """`value` with every non-finite float None: JSON has no NaN or Infinity (json.dumps would
    write them, and a strict reader then rejects the whole file)."""
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


if __name__ == "__main__":
    raise SystemExit(main())
