"""Data-parallel training under torchrun: process-group set-up and teardown, rank helpers.

`torchrun --nproc_per_node N [--nnodes M ...] -m ddpm_fast.train ...` starts one process per
GPU and tells each, through RANK, WORLD_SIZE and LOCAL_RANK (plus MASTER_ADDR/MASTER_PORT for
the rendezvous), who it is. `distributed_session` reads those, puts each rank on
cuda:LOCAL_RANK with NCCL (CPU runs use gloo), and destroys the process group on the way out.
Without torchrun, or with WORLD_SIZE=1, it sets nothing up and the run is the plain
single-process one: no process group, no DDP wrapper, no collectives.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# Collectives wait this long for a straggler before failing. Generous because rank 0 alone
# writes sample grids and runs --eval-every KID/FID while the other ranks wait for it at their
# next collective; a rank that dies is noticed sooner anyway, since torchrun then stops the others.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the run. `control` is a gloo group over all ranks for small
    host-side agreements (the Ctrl-C vote, gathering RNG states) that must not queue behind
    the GPU's work; None in a single-process run."""

    rank: int
    world_size: int
    device: torch.device
    control: dist.ProcessGroup | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_ranks() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from the torchrun environment; None outside torchrun."""
    present = [v for v in _TORCHRUN_VARS if v in os.environ]
    if not present:
        return None
    if len(present) != len(_TORCHRUN_VARS):
        missing = sorted(set(_TORCHRUN_VARS) - set(present))
        raise ValueError(f"{', '.join(present)} set but {', '.join(missing)} not: launch with torchrun "
                         f"(python -m torch.distributed.run), which sets all of {', '.join(_TORCHRUN_VARS)}")
    rank, world, local = (int(os.environ[v]) for v in _TORCHRUN_VARS)
    return rank, world, local


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of a rank: cuda:LOCAL_RANK when training on CUDA, else the CPU."""
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(f"--device {device} names one GPU, but torchrun starts several processes "
                         f"and each takes its own: use --device cuda (rank i of a node uses cuda:LOCAL_RANK)")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible: "
                         f"lower torchrun's --nproc_per_node")
    return torch.device("cuda", local_rank)


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """--batch-size is the global batch: each rank takes an equal share."""
    if global_batch % world_size:
        lower = global_batch // world_size * world_size
        hint = f"{lower} or {lower + world_size}" if lower else str(world_size)
        raise ValueError(f"--batch-size {global_batch} is the global batch and must divide evenly among "
                         f"the {world_size} processes; use a multiple of {world_size}, e.g. {hint}")
    return global_batch // world_size


@contextlib.contextmanager
def distributed_session(device: torch.device) -> Iterator[DistContext]:
    """The run's DistContext; under torchrun with WORLD_SIZE > 1 the process group lives for
    the duration of the `with` block, and is destroyed however the block ends."""
    ranks = torchrun_ranks()
    if ranks is None or ranks[1] == 1:
        yield DistContext(rank=0, world_size=1, device=device)
        return
    rank, world, local_rank = ranks
    device = rank_device(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and every later `.cuda()` use the current device
        dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        # A group of its own even on CPU, so the vote and gathers never interleave with DDP's buckets.
        control = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
        yield DistContext(rank=rank, world_size=world, device=device, control=control)
    finally:
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """The module the train step should call: `model` itself in a single-process run, else a
    DistributedDataParallel wrapper, which broadcasts rank 0's weights now (so every rank starts
    identical) and all-reduces the gradients in buckets while the backward still runs.

    Call it after any `.to(memory_format=torch.channels_last)` (the buckets take the
    parameters' strides) and before torch.compile (dynamo then splits the graph at bucket
    boundaries to keep the overlap). gradient_as_bucket_view: the gradients are views into the
    all-reduce buckets, saving a copy and a model's worth of memory. static_graph stays off:
    it only pays with unused parameters or activation checkpointing, neither of which the
    UNet has, and dynamo's DDP graph splitting is not known to be safe with it (pytorch#109261).
    The UNet has no buffers, so DDP's per-forward buffer broadcast never runs."""
    if not ctx.enabled:
        return model
    if ctx.device.type != "cuda":
        return DistributedDataParallel(model, gradient_as_bucket_view=True)
    # Built on a side stream, as a whole-step CUDA graph capture of the DDP backward requires
    # (PyTorch's CUDA-graph notes on DDP); the default stream then waits for its broadcast.
    side = torch.cuda.Stream(ctx.device)
    side.wait_stream(torch.cuda.current_stream(ctx.device))
    with torch.cuda.stream(side):
        ddp = DistributedDataParallel(model, device_ids=[ctx.device.index], gradient_as_bucket_view=True)
    torch.cuda.current_stream(ctx.device).wait_stream(side)
    return ddp


def all_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum `t` over the ranks, in place (a no-op on one process); returns `t`."""
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_to_main(obj: object, ctx: DistContext) -> list[object] | None:
    """Every rank's `obj` in rank order on rank 0 (None on the others)."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0, group=ctx.control)
    return out


def derived_seed(seed: int, rank: int, step: int) -> int:
    """A seed for a rank joining a resumed run that has no saved RNG state for it (the run was
    saved with fewer processes): a pure function of (seed, rank, step), distinct per rank."""
    # 63 bits: a non-negative int64, which every generator's manual_seed accepts.
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


class StopVote:
    """Lets all ranks stop after the same step when any of them is interrupted.

    Each call contributes this rank's local flag to an asynchronous MAX all-reduce on the gloo
    control group and answers with the result of the previous call's all-reduce: every rank
    learns of a Ctrl-C at the same step, one step late, and no step waits on the round trip.
    In a single-process run the local flag is the answer, at once."""

    def __init__(self, ctx: DistContext):
        self.ctx = ctx
        self.flag = torch.zeros(1, dtype=torch.int32)
        self.pending: dist.Work | None = None

    def __call__(self, local_stop: bool) -> bool:
        if not self.ctx.enabled:
            return local_stop
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
            if self.flag.item():
                return True
        self.flag.fill_(int(local_stop))
        self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.ctx.control, async_op=True)
        return False

    def settle(self) -> None:
        """Wait for the vote in flight, so no collective is left pending at teardown."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
