"""python -m ddpm_fast.train: train a DDPM on an image folder (or the embedded default set).

    python -m ddpm_fast.train                                   # tiny model, embedded data, CPU-friendly
    python -m ddpm_fast.train --data ~/anime --preset anime64 --epochs 100 --out runs/anime
    python -m ddpm_fast.train --resume runs/anime                # continue exactly where it stopped

Several GPUs (data-parallel, one process per GPU; --batch-size is the global batch):
    torchrun --nproc_per_node 8 -m ddpm_fast.train --data ~/anime --preset anime64 --batch-size 1024
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST --master_port 29500 \
        -m ddpm_fast.train ...                                   # node_rank 1 on the other machine
A run resumes with any number of processes. Every rank reads the checkpoint when resuming, so
across machines --out must be on a shared file system (rank 0 alone writes it).
"""
from __future__ import annotations

import argparse

from .cli import int_tuple, positive_int, run
from .presets import PRESETS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--data", help="image folder, searched recursively (default: the embedded set)")
    g.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model preset (default: tiny)")
    g.add_argument("--image-size", type=positive_int)
    g.add_argument("--ch", type=positive_int, help="base channel width")
    g.add_argument("--ch-mult", type=int_tuple, help="width multipliers per level, e.g. 1,2,4,4")
    g.add_argument("--attn-res", type=int_tuple, help="resolutions with self-attention, e.g. 16")
    g.add_argument("--num-res-blocks", type=positive_int)
    g.add_argument("--dropout", type=float)
    g.add_argument("--act", choices=("silu", "hardswish"))
    g.add_argument("--loader", default="auto", choices=("auto", "torch", "cache", "dali"))
    g.add_argument("--workers", type=int, default=4, help="DataLoader workers (torch loader)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=positive_int,
                   help="global batch; under torchrun each of the N processes takes batch / N")
    g.add_argument("--epochs", type=positive_int)
    g.add_argument("--steps", type=positive_int, help="total optimizer steps (overrides --epochs)")
    g.add_argument("--lr", type=float)
    g.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine"))
    g.add_argument("--warmup", type=int, help="linear warm-up steps")
    g.add_argument("--ema-decay", type=float, default=0.9999)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("diffusion")
    g.add_argument("--schedule", default="linear", choices=("linear", "cosine", "continuous"))
    g.add_argument("--timesteps", type=positive_int, default=1000)
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:1, ... (under torchrun: auto, cuda or cpu; rank i of a node "
                        "uses cuda:LOCAL_RANK)")
    g.add_argument("--kernels", default="auto", choices=("auto", "torch", "triton", "cpp"),
                   help="backend of the fused ops (auto: the reference unless measured faster)")
    g.add_argument("--fast", action="store_true",
                   help="the fast path: bf16 autocast (fp32 master weights), channels_last, torch.compile and, "
                        "on a GPU, the whole step in one CUDA graph")
    g.add_argument("--compile", default="default", metavar="MODE",
                   help="torch.compile mode of --fast (default, max-autotune-no-cudagraphs, ...) or none")
    g.add_argument("--out", default="runs/default", help="run folder")
    g.add_argument("--resume", nargs="?", const="", metavar="RUN",
                   help="continue the run in RUN (a run folder or checkpoint; default: --out)")
    g.add_argument("--save-every", type=positive_int, default=1000, help="steps between checkpoints")
    g.add_argument("--sample-every", type=positive_int, default=500, help="steps between sample grids")
    g.add_argument("--log-every", type=positive_int, default=10, help="steps between metrics.csv rows")
    g.add_argument("--sample-n", type=positive_int, default=16)
    g.add_argument("--sample-method", default="ddpm", choices=("ddpm", "ddim"), help="sampler of the grids")
    g.add_argument("--sample-steps", type=positive_int, default=50, help="DDIM steps of the interval grids")
    g.add_argument("--sample-clip-x0", action=argparse.BooleanOptionalAction, default=True,
                   help="clamp the predicted x0 to [-1, 1] in the grids (as Ho et al.'s sampler does)")
    g.add_argument("--eval-every", type=int, default=0, help="steps between KID/FID evaluations (0: off)")
    g.add_argument("--eval-samples", type=positive_int, default=256)
    return p


MODEL_FLAGS = ("image_size", "ch", "ch_mult", "attn_res", "num_res_blocks", "dropout", "act")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body():
        from .training.config import TrainConfig
        from .training.loop import train

        kw = {k: v for k, v in vars(args).items() if k not in MODEL_FLAGS}
        if kw["resume"] == "":
            kw["resume"] = args.out
        cfg = TrainConfig(**kw, model_overrides={k: getattr(args, k) for k in MODEL_FLAGS})
        train(cfg)

    return run("ddpm_fast.train", body)


if __name__ == "__main__":
    raise SystemExit(main())
