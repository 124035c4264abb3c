"""python -m ddpm_fast.sample: images from a trained run.

    python -m ddpm_fast.sample --ckpt runs/default --n 64 --out grid.png
    python -m ddpm_fast.sample --ckpt runs/default --method ddim --steps 50 --out grid.png
    python -m ddpm_fast.sample --ckpt runs/default --n 10000 --individual --out samples/  # for FID tools
    python -m ddpm_fast.sample --ckpt runs/default --process 4 --out chains.png          # k chains x m snapshots
    python -m ddpm_fast.sample --ckpt runs/default --gif --out chain.gif
    python -m ddpm_fast.sample --ckpt runs/default --recover 300 --out recover.png       # noise test images, denoise
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..argtypes import non_negative_int, positive_int, seed_int
from .cli import add_debug_argument, add_plan_arguments, add_sampler_arguments, plan_from_args, run, sampler_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="run folder or checkpoint file (a kept one: RUN/checkpoints/step_N.pt)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    p.add_argument("--n", type=positive_int, default=16, help="number of images")
    p.add_argument("--batch-size", type=positive_int, default=256,
                   help="images per sampling batch: a larger --n (or --class set) is drawn in batches of this "
                        "many, each moved to the CPU, so --n 10000 --individual fits in memory")
    p.add_argument("--nrow", type=positive_int, help="images per grid row")
    p.add_argument("--class", dest="classes", action="append", metavar="NAME",
                   help="class to sample, of a class-conditional model (repeatable; all: --n of each class, "
                        "a grid row per class)")
    add_sampler_arguments(p)
    p.add_argument("--seed", type=seed_int, default=0)
    add_plan_arguments(p)
    add_debug_argument(p)
    p.add_argument("--out", default="samples.png", help="output PNG/GIF, or a folder with --individual")
    p.add_argument("--individual", action="store_true", help="one PNG per image into the folder --out")
    p.add_argument("--process", type=positive_int, metavar="K", help="K chains x --snapshots snapshots")
    p.add_argument("--snapshots", type=positive_int, default=10)
    p.add_argument("--gif", action="store_true", help="an animated GIF of the chain of --n images")
    p.add_argument("--recover", type=non_negative_int, metavar="T",
                   help="noise --n test images to step T and denoise them with both variances")
    p.add_argument("--data", help="image folder for --recover (default: the run's data)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run("ddpm_fast.sample", lambda: _sample(args), debug=args.debug)


def _sample(args) -> None:
    import torch

    from ..checkpoint import load_model
    from ..evaluation import sample_in_batches
    from ..images import image_grid, save_image, save_image_grid, to_uint8
    from ..sampling import model_channels

    out = check_out(args)
    plan = plan_from_args(args)
    model, diffusion, cfg = load_model(args.ckpt, ema=args.ema, device=plan.device)
    if args.recover is not None and args.recover >= diffusion.timesteps:
        raise ValueError(f"--recover {args.recover}: {args.ckpt} has T = {diffusion.timesteps} diffusion steps, "
                         f"so T may be 0 to {diffusion.timesteps - 1}")
    model = plan.prepare(model)
    size = cfg["model"]["image_size"]
    if plan.cuda_graphs:
        # CUDA-graph replays draw noise from the device's default generator: seed that one.
        torch.manual_seed(args.seed)
        gen = None
    else:
        gen = torch.Generator(device=plan.device).manual_seed(args.seed)
    make = lambda **kw: sampler_from_args(model, diffusion, args, plan, **kw)  # noqa: E731

    if args.recover is not None:
        from ..data import load_images
        from ..data.hf import image_folder

        data = args.data if args.data is not None else cfg.get("data")
        data = image_folder(data, cfg.get("image_column", "image"))  # a dataset's images, written out once
        x0 = load_images(data, size, split="test", limit=args.n, channels=model_channels(model)).to(plan.device)
        t = torch.full((x0.shape[0],), args.recover, device=plan.device, dtype=torch.long)
        noisy = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=gen, device=plan.device))
        rows = [x0, noisy]
        for variance in ("beta", "posterior"):
            ddpm = make(method="ddpm", steps=None, spacing=None, sigma_min=None, sigma_max=None, order=None,
                        variance=variance)
            rows.append(ddpm.sample(x0.shape[0], size, generator=gen, x_start=noisy, start_t=args.recover))
        # Columns: original | noisy | variance beta | variance beta-tilde, one row per image.
        save_image(image_grid(torch.stack(rows, 1).flatten(0, 1), nrow=4), out)
    elif args.process or args.gif:
        k = args.process or args.n
        images, traj = make().sample(k, size, generator=gen, return_trajectory=True)
        if args.gif:
            frames = [image_grid(traj[i], nrow=args.nrow) for i in
                      torch.linspace(0, len(traj) - 1, 60).round().long().tolist()]
            frames += [image_grid(images, nrow=args.nrow)] * 10  # hold the result
            save_image(frames[0], out, save_all=True, append_images=frames[1:], duration=80, loop=0)
        else:
            idx = torch.linspace(0, len(traj) - 1, args.snapshots).round().long()
            strip = traj[idx].clamp(-1, 1).transpose(0, 1).flatten(0, 1)  # chain-major rows
            save_image(image_grid(strip, nrow=args.snapshots), out)
    else:
        labels, nrow = class_labels(args.classes, cfg, args.n, args.ckpt)
        n = args.n if labels is None else len(labels)
        images = sample_in_batches(make(), n, size, gen, args.batch_size, labels)
        args.nrow = args.nrow or nrow
        if args.individual:
            save_individual(to_uint8(images), out)
        else:
            save_image_grid(images, out, nrow=args.nrow)
    print(f"wrote {out}")


def check_out(args) -> Path:
    """--out, refused before anything is computed when it cannot take what is asked for: a file
    for --individual, a folder or a name without an image extension otherwise."""
    from PIL import Image

    out = Path(args.out)
    if args.individual:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file: --individual writes one PNG per image into a folder")
        return out
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: give an image file (grid.png), or --individual for one PNG "
                         "per image in it")
    if out.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {out}: not an image file name (give .png, .jpg, .gif, ...)")
    return out


def save_individual(images, out: Path) -> None:
    """One PNG per image into `out`; should one fail (a full disk), the new files this call wrote
    are removed again (no run of files that stops part way; a file it replaced stays replaced)."""
    from PIL import Image

    from ..images import save_image

    out.mkdir(parents=True, exist_ok=True)
    new = []
    try:
        for i, arr in enumerate(images):
            path = out / f"{i:06d}.png"
            if not path.exists():
                new.append(path)
            save_image(Image.fromarray(arr), path)
    except BaseException:
        for p in new:
            p.unlink(missing_ok=True)
        raise


def class_labels(wanted: list[str] | None, cfg: dict, n: int, ckpt) -> tuple[list[int] | None, int | None]:
    """(a label per image, images per grid row) for --class: n of each class named, in order."""
    if not wanted:
        return None, None
    names = cfg.get("class_names")
    if not names:
        raise ValueError(f"--class: {ckpt} is an unconditional model (it was trained without --class-cond)")
    wanted = list(names) if wanted == ["all"] else wanted
    for w in wanted:
        if w not in names:
            raise ValueError(f"--class {w!r} is not a class of {ckpt}; its classes: {', '.join(names)} (or all)")
    return [names.index(w) for w in wanted for _ in range(n)], n


if __name__ == "__main__":
    raise SystemExit(main())
