"""python -m benchmarks.colour_stats --ckpt RUN [--ckpt RUN ...]: how far a colour model's samples are
from its data's colour statistics, beside KID.

The grey-tint fixes (--mean-skip, --norm-out-groups, --num-groups 8) take an RGB model's per-sample
hue off grey data and cost KID on the emoji glyphs; this shows what changes in the colour of the
samples. Each run's EMA model draws --samples with the default sampler from one seed; the data is
the run's --data split (val, the ablation's KID reference). Every figure in 0..255 of (N, 3, H, W)
images: saturation = mean |channel - grey| over pixels (grey = the channel mean: grey_tint's cast),
hue = the same of each image's per-channel means, colour spread = the standard deviation over
images of those means (mean over the channels), contrast = the pixels' standard deviation, the
border's cast = the saturation of each image's two-pixel frame (the glyphs' background is grey),
and grain = mean |pixel - the mean of its 3x3 neighbourhood| (edges replicated): the high
frequencies, which leftover noise adds to a flat-coloured set's samples and KID barely sees.

Writes colour_stats.json and .md to $OUT when set, else benchmarks/results/."""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from ddpm_fast import FastSampler
from ddpm_fast.argtypes import number, seed_int
from ddpm_fast.checkpoint import load_model
from ddpm_fast.data import load_images

from .common import write_result
from .grey_tint import cast, contrast, hue
from .report_parts import md_table


def border(images: torch.Tensor, width: int = 2) -> torch.Tensor:
    """The pixels of each image's frame `width` wide, as (N, C, P, 1)."""
    mask = torch.ones(images.shape[-2:], dtype=torch.bool)
    mask[width:-width, width:-width] = False
    return images[..., mask].unsqueeze(-1)


def grain(images: torch.Tensor) -> float:
    """Mean |pixel - its 3x3 neighbourhood's mean| in 0..255 of (N, C, H, W) images in [-1, 1]."""
    x = (images.clamp(-1, 1) + 1) * 127.5
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return float((x - blurred).abs().mean())


def figures(images: torch.Tensor) -> dict:
    means = (images.clamp(-1, 1).mean((2, 3)) + 1) * 127.5
    return {"saturation": round(cast(images), 2), "hue": round(hue(images), 2),
            "colour_spread": round(float(means.std(0).mean()), 2), "contrast": round(contrast(images), 1),
            "border_cast": round(cast(border(images)), 2), "grain": round(grain(images), 2)}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.colour_stats", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, help="a run (its EMA weights); repeat for more")
    # at least 2: the colour spread is a standard deviation over the samples
    p.add_argument("--samples", type=number(int, 2), default=256)
    p.add_argument("--split", default="val", choices=("train", "val", "test"), help="the data's split")
    p.add_argument("--seed", type=seed_int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    result = {"env": vars(args), "data": {}, "runs": {}}
    for ckpt in args.ckpt:
        model, diffusion, cfg = load_model(ckpt)
        size, data = cfg["model"]["image_size"], cfg["data"] or "the embedded set"
        if data not in result["data"]:
            result["data"][data] = figures(load_images(cfg["data"], size, split=args.split,
                                                       channels=cfg["model"].get("in_ch", 3)))
        samples = FastSampler(model, diffusion, dtype=torch.float32).sample(  # as the committed figures
            args.samples, size, generator=torch.Generator().manual_seed(args.seed))
        result["runs"][ckpt] = figures(samples) | {"data": data}
        print(ckpt, result["runs"][ckpt], flush=True)
        write_result("colour_stats", result)
    write_report("colour_stats", result, args.split)
    return 0


def write_report(name: str, result: dict, split: str, first: str = "run", extra: tuple[str, ...] = ()) -> None:
    """`name`.json and .md (printed): the data's figures, then each run's with its `extra` columns."""
    names = list(next(iter(result["data"].values())))
    rows = [[f"the data ({d}, {split})", *v.values(), *[""] * len(extra)] for d, v in result["data"].items()]
    rows += [[k, *(v[n] for n in (*names, *extra))] for k, v in result["runs"].items()]
    md = md_table([first, *names, *extra], rows)
    path = write_result(name, result)
    path.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    raise SystemExit(main())
