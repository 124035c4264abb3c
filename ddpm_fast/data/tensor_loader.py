"""Loader over images already decoded into one uint8 NHWC tensor (the embedded set, the cache).

When the tensor lives on the training device, a batch is a gather, a flip and a normalise on
that device: no decoding and no host round trip. A host tensor (for example a memory-mapped
cache too big for the device) is gathered on the host and copied as uint8.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .order import EpochLoader, EpochPlan
from .transforms import to_model_range


class TensorLoader(EpochLoader):
    backend = "memory"

    def __init__(self, images: torch.Tensor, batch_size: int, *, backend: str = "memory",
                 rows: torch.Tensor | None = None, **order) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} "
                             f"{tuple(images.shape)}")
        # `rows` maps the split's image i to images[rows[i]] (a split inside a host-side
        # memory map that is not copied); None when `images` is exactly the split.
        self.rows = rows
        super().__init__(images.shape[0] if rows is None else len(rows), batch_size, **order)
        self.images, self.backend = images, backend

    def _batches(self, plan: EpochPlan, start_batch: int) -> Iterator[torch.Tensor]:
        # One small copy of the epoch's indices and flips, then everything stays put.
        idx_all = torch.from_numpy(plan.indices)
        if self.rows is not None:
            idx_all = self.rows[idx_all]
        idx_all = idx_all.to(self.images.device)
        flip_all = torch.from_numpy(plan.flips).to(self.device)
        bs = plan.batch_size
        for b in range(start_batch, len(plan)):
            x = self.images.index_select(0, idx_all[b * bs:(b + 1) * bs])
            if x.device != self.device:
                x = x.pin_memory() if self.device.type == "cuda" else x
                x = x.to(self.device, non_blocking=True)
            if self.flip:
                # Flip while still uint8 (a quarter of the bytes), with a select rather than
                # boolean indexing, which would synchronise the GPU with the host.
                f = flip_all[b * bs:(b + 1) * bs].view(-1, 1, 1, 1)
                x = torch.where(f, x.flip(2), x)
            yield to_model_range(x, self.device)
