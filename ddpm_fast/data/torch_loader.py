"""The `torch` backend: a DataLoader whose workers decode files with PIL.

Workers return uint8 NHWC (a quarter of the bytes of float) in pinned memory on CUDA; the
normalise happens on the device. Batches come from the shared epoch plan through a batch
sampler, so the order and flips are those of every other backend, and with persistent
workers a new epoch does not restart the worker processes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .order import EpochLoader, EpochPlan
from .transforms import load_uint8, to_model_range


class _FileDataset(Dataset):
    def __init__(self, files: list[Path], image_size: int) -> None:
        self.files = [str(f) for f in files]
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, bool]) -> torch.Tensor:
        index, flip = item
        arr = load_uint8(self.files[index], self.image_size)
        if flip:
            arr = np.ascontiguousarray(arr[:, ::-1])
        return torch.from_numpy(arr)


class _PlanSampler:
    """Batch sampler over the loader's current plan: lists of (index, flip)."""

    def __init__(self) -> None:
        self.plan: EpochPlan | None = None
        self.start_batch = 0

    def __len__(self) -> int:
        return len(self.plan) - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        for b in range(self.start_batch, len(self.plan)):
            idx, fl = self.plan.batch(b)
            yield list(zip(idx.tolist(), fl.tolist()))


def default_workers(device: torch.device) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(8 if device.type == "cuda" else 2, cpus or 1)


class TorchFileLoader(EpochLoader):
    backend = "torch"

    def __init__(self, files: list[Path], image_size: int, batch_size: int, *,
                 num_workers: int | None = None, **order) -> None:
        super().__init__(len(files), batch_size, **order)
        workers = default_workers(self.device) if num_workers is None else num_workers
        self._sampler = _PlanSampler()
        self._loader = DataLoader(
            _FileDataset(files, image_size), batch_sampler=self._sampler,
            num_workers=workers, pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        )

    def _batches(self, plan: EpochPlan, start_batch: int) -> Iterator[torch.Tensor]:
        self._sampler.plan, self._sampler.start_batch = plan, start_batch
        for batch in self._loader:
            yield to_model_range(batch, self.device)
