"""python -m ddpm_fast.train: train a DDPM on an image folder (or the embedded default set).

    python -m ddpm_fast.train                                   # tiny model, embedded data, CPU-friendly
    python -m ddpm_fast.train --data ~/anime --preset anime64 --epochs 100 --out runs/anime
    python -m ddpm_fast.train --resume runs/anime                # continue exactly where it stopped
    python -m ddpm_fast.train --resume runs/anime --lr 1e-4      # the same run, from here at another lr

Several GPUs (data-parallel, one process per GPU; --batch-size is the global batch):
    torchrun --nproc_per_node 8 -m ddpm_fast.train --data ~/anime --preset anime64 --batch-size 1024
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST --master_port 29500 -m ddpm_fast.train ...
                                                                 # and --node_rank 1 on the other machine
A run resumes with any number of processes. Every rank reads the checkpoint when resuming, so
across machines --out must be on a shared file system (rank 0 alone writes it).
"""
from __future__ import annotations

import argparse

from .cli import add_debug_argument, run


def build_parser() -> argparse.ArgumentParser:
    from ..training.config import TrainConfig

    p = argparse.ArgumentParser(prog="python -m ddpm_fast.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    TrainConfig.add_arguments(p)
    add_debug_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body():
        from ..training.config import TrainConfig
        from ..training.loop import train

        train(TrainConfig.from_args(args))

    return run("ddpm_fast.train", body, debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
