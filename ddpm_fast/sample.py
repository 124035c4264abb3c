"""python -m ddpm_fast.sample: images from a trained run.

    python -m ddpm_fast.sample --ckpt runs/default --n 64 --out grid.png
    python -m ddpm_fast.sample --ckpt runs/default --method ddim --steps 50 --out grid.png
    python -m ddpm_fast.sample --ckpt runs/default --n 1000 --individual --out samples/   # for FID tools
    python -m ddpm_fast.sample --ckpt runs/default --process 4 --out chains.png          # k chains x m snapshots
    python -m ddpm_fast.sample --ckpt runs/default --gif --out chain.gif
    python -m ddpm_fast.sample --ckpt runs/default --recover 300 --out recover.png       # noise test images, denoise
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

from .cli import positive_int, run


class _CallableModule(types.ModuleType):
    """Importing this submodule rebinds the package attribute `ddpm_fast.sample` from the
    function to the module (DECISIONS.md 1); calling the module calls the function, so
    `ddpm_fast.sample(model, diffusion, ...)` keeps working either way."""

    def __call__(self, *args, **kwargs):
        from .sampling import sample

        return sample(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run folder or checkpoint file")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    p.add_argument("--n", type=positive_int, default=16, help="number of images")
    p.add_argument("--nrow", type=positive_int, help="images per grid row")
    p.add_argument("--method", default="ddpm", choices=("ddpm", "ddim"))
    p.add_argument("--steps", type=positive_int, help="DDIM steps (default: all)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--variance", default="beta", choices=("beta", "posterior"),
                   help="DDPM reverse variance: beta_t or beta-tilde_t")
    p.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=True,
                   help="clamp the predicted x0 to [-1, 1] each step, as Ho et al.'s sampler and diffusers do "
                        "(--no-clip-x0: the plain eq. 11 update)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--kernels", default="auto", choices=("auto", "torch", "triton", "cpp"))
    p.add_argument("--fast", action="store_true",
                   help="bf16 and channels_last, each step a CUDA-graph replay (on a GPU; plain sampling on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (with --fast)")
    p.add_argument("--out", default="samples.png", help="output PNG/GIF, or a folder with --individual")
    p.add_argument("--individual", action="store_true", help="one PNG per image into the folder --out")
    p.add_argument("--process", type=positive_int, metavar="K", help="K chains x --snapshots snapshots")
    p.add_argument("--snapshots", type=positive_int, default=10)
    p.add_argument("--gif", action="store_true", help="an animated GIF of the chain of --n images")
    p.add_argument("--recover", type=int, metavar="T",
                   help="noise --n test images to step T and denoise them with both variances")
    p.add_argument("--data", help="image folder for --recover (default: the run's data)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run("ddpm_fast.sample", lambda: _sample(args))


def _sample(args) -> None:
    import torch

    from .sampling import FastSampler
    from .training.checkpoint import load_model
    from .training.logging import image_grid, to_uint8
    from .training.loop import resolve_device

    device = resolve_device(args.device)
    model, diffusion, cfg = load_model(args.ckpt, ema=args.ema, device=device)
    model.set_backend(args.kernels)
    size = cfg["model"]["image_size"]
    fast_gpu = args.fast and device.type == "cuda"
    if fast_gpu:
        # CUDA-graph replays draw noise from the device's default generator: seed that one.
        torch.manual_seed(args.seed)
        model = model.to(memory_format=torch.channels_last)
        gen = None
    else:
        gen = torch.Generator(device=device).manual_seed(args.seed)
    make = lambda variance=args.variance: FastSampler(  # noqa: E731
        model, diffusion, method=args.method, steps=args.steps, eta=args.eta, variance=variance,
        clip_x0=args.clip_x0, dtype=torch.bfloat16 if fast_gpu else None, compile=args.fast and args.compile,
        cuda_graph="auto" if args.fast else False)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    if args.recover is not None:
        from .data import load_images

        data = args.data if args.data is not None else cfg.get("data")
        x0 = load_images(data, size, split="test", limit=args.n).to(device)
        t = torch.full((x0.shape[0],), args.recover, device=device, dtype=torch.long)
        noisy = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=gen, device=device))
        rows = [x0, noisy]
        for variance in ("beta", "posterior"):
            rows.append(make(variance).sample(x0.shape[0], size, generator=gen, x_start=noisy, start_t=args.recover))
        # Columns: original | noisy | variance beta | variance beta-tilde, one row per image.
        image_grid(torch.stack(rows, 1).flatten(0, 1), nrow=4).save(out)
    elif args.process or args.gif:
        k = args.process or args.n
        images, traj = make().sample(k, size, generator=gen, return_trajectory=True)
        if args.gif:
            frames = [image_grid(traj[i], nrow=args.nrow) for i in
                      torch.linspace(0, len(traj) - 1, 60).round().long().tolist()]
            frames += [image_grid(images, nrow=args.nrow)] * 10  # hold the result
            frames[0].save(out, save_all=True, append_images=frames[1:], duration=80, loop=0)
        else:
            idx = torch.linspace(0, len(traj) - 1, args.snapshots).round().long()
            strip = traj[idx].clamp(-1, 1).transpose(0, 1).flatten(0, 1)  # chain-major rows
            image_grid(strip, nrow=args.snapshots).save(out)
    else:
        images = make().sample(args.n, size, generator=gen)
        if args.individual:
            from PIL import Image

            out.mkdir(parents=True, exist_ok=True)
            for i, arr in enumerate(to_uint8(images)):
                Image.fromarray(arr).save(out / f"{i:06d}.png")
        else:
            image_grid(images, nrow=args.nrow).save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())
