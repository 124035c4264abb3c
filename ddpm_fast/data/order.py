"""Epoch order shared by every backend.

The order of an epoch (permutation and flips) is a pure function of (seed, epoch, rank,
world_size) (docs/DESIGN.md): a resumed run calls `set_epoch(e, start_batch)` and gets exactly the
batches it had not yet seen. Rank r takes every world_size-th item of the epoch's permutation,
so the shards are disjoint and together cover the split; with drop_last every rank yields the
same number of full batches, as DDP needs.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..plan import resolve_device
from .transforms import to_channels


@dataclass(frozen=True)
class EpochPlan:
    """This rank's indices and flips for one epoch, batch after batch."""

    indices: np.ndarray  # int64 (num_batches * batch_size or fewer), into the split's images
    flips: np.ndarray  # bool, same length
    batch_size: int

    def batch(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
        return self.indices[sl], self.flips[sl]

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)


def batches_per_epoch(num_images: int, batch_size: int, rank: int, world_size: int,
                      drop_last: bool) -> int:
    """Batches rank `rank` yields per epoch. Shards differ in size by at most one item; with
    drop_last all ranks use the smallest shard's count so that they stay in step."""
    if drop_last:
        return (num_images // world_size) // batch_size
    return math.ceil(len(range(rank, num_images, world_size)) / batch_size)


def epoch_plan(num_images: int, batch_size: int, *, seed: int, epoch: int, rank: int,
               world_size: int, shuffle: bool, flip: bool, drop_last: bool) -> EpochPlan:
    """The plan for (seed, epoch, rank, world_size)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_images) if shuffle else np.arange(num_images)
    flips = rng.random(num_images) < 0.5 if flip else np.zeros(num_images, dtype=bool)
    flips = flips[order]  # a flip belongs to a position in the epoch, drawn with the order
    mine = slice(rank, None, world_size)
    idx, fl = order[mine], flips[mine]
    if drop_last:
        keep = batches_per_epoch(num_images, batch_size, rank, world_size, True) * batch_size
        idx, fl = idx[:keep], fl[:keep]
    return EpochPlan(idx.astype(np.int64), fl, batch_size)


class EpochLoader(abc.ABC):
    """Base of the backends: epoch bookkeeping and the public loader interface. A backend takes
    its own arguments, passes these on (build_loader's `order`) and implements `_batches`.

    Iterating yields this epoch's batches from `start_batch` on; when an iteration runs to the
    end the next one starts the following epoch, so a trainer that never calls set_epoch still
    gets a fresh order each epoch."""

    backend = "base"
    # Seconds spent on one-time preparation (the cache build), reported apart from epoch time.
    build_seconds = 0.0
    # Class labels of the split's images (a long tensor on the device) of a class-conditional run:
    # batches then come as (images, labels), and class_names names the labels.
    labels: torch.Tensor | None = None
    class_names: tuple[str, ...] | None = None

    def __init__(self, num_images: int, batch_size: int, *, device: str | torch.device | None, seed: int,
                 shuffle: bool, flip: bool, drop_last: bool, rank: int, world_size: int, channels: int = 3,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size} (--batch-size)")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.num_images, self.batch_size, self.device = num_images, batch_size, resolve_device(device)
        self.seed, self.shuffle, self.flip, self.drop_last = seed, shuffle, flip, drop_last
        self.rank, self.world_size = rank, world_size
        self.channels = channels  # of the batches: the backends decode RGB, __iter__ reduces it once for all
        self.memory_format = memory_format  # the plan's (ExecutionPlan.memory_format), laid out in __iter__
        self.epoch, self.start_batch = 0, 0
        if len(self) == 0:
            raise ValueError(f"{num_images} images give no full batch of {batch_size} per rank with "
                             f"{world_size} rank(s); lower --batch-size or add images")

    def __len__(self) -> int:
        return batches_per_epoch(self.num_images, self.batch_size, self.rank,
                                 self.world_size, self.drop_last)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration yields epoch `epoch`'s batches from `start_batch` on."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} not in [0, {len(self)}]")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def plan(self, epoch: int) -> EpochPlan:
        return epoch_plan(self.num_images, self.batch_size, seed=self.seed, epoch=epoch,
                          rank=self.rank, world_size=self.world_size, shuffle=self.shuffle,
                          flip=self.flip, drop_last=self.drop_last)

    def __iter__(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self.epoch, self.start_batch
        plan = self.plan(epoch)
        batches = (to_channels(x, self.channels).contiguous(memory_format=self.memory_format)
                   for x in self._batches(plan, start))
        if self.labels is None:
            yield from batches
        else:  # every backend yields the plan's batches in order, so the labels follow the same indices
            order = torch.from_numpy(plan.indices).to(self.labels.device)
            for b, x in enumerate(batches, start):
                yield x, self.labels.index_select(0, order[b * plan.batch_size:(b + 1) * plan.batch_size])
        self.epoch, self.start_batch = epoch + 1, 0

    @abc.abstractmethod
    def _batches(self, plan: EpochPlan, start_batch: int) -> Iterator[torch.Tensor]:
        """Yield the batches of `plan` from `start_batch` on, as model input."""
