"""The `dali` backend: NVIDIA DALI decodes (nvJPEG on the GPU), resizes, crops, mirrors and
normalises in its own threads and hands over device tensors.

DALI's reader shuffles with a local buffer of its own, which cannot honour the loader contract (docs/DESIGN.md: the
order and flips of an epoch are a pure function of (seed, epoch, rank, world_size), the same
for every backend). So each epoch gets a pipeline over this rank's files in the shared plan's
order, from the resume batch on, with the plan's flips passed as the reader's labels; the
rank's shard is already cut by the plan, so the reader itself runs with one shard. Building a
pipeline takes well under a second, against an epoch of tens of seconds.

Only files that passed validation reach DALI: a bad file would stop its pipeline mid-epoch.
Should one still fail to decode, the loader finds which (one file at a time, on the batches in
flight) and names it in a ValueError.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from .order import EpochLoader, EpochPlan
from .torch_loader import default_workers

INSTALL_HINT = ("the dali loader needs NVIDIA DALI: pip install 'ddpm-fast[dali]' "
                "(or pip install nvidia-dali-cuda130), or pick --loader torch/cache")


def _import_dali():
    try:
        import nvidia.dali.backend
        import nvidia.dali.fn
        import nvidia.dali.plugin.pytorch
        import nvidia.dali.types  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return nvidia.dali


class DaliLoader(EpochLoader):
    backend = "dali"

    def __init__(self, files: list[Path], image_size: int, batch_size: int, *,
                 num_workers: int | None = None, **order) -> None:
        self._dali = _import_dali()
        super().__init__(len(files), batch_size, **order)
        if self.device.type == "cuda" and self._dali.backend.GetCUDADeviceCount() == 0:
            raise RuntimeError("the dali loader was asked for a CUDA device but DALI sees no GPU")
        self.files = [str(f) for f in files]
        self.image_size = image_size
        self.threads = num_workers or default_workers(self.device)

    def _pipeline(self, files: list[str], flips: list[int], batch_size: int | None = None):
        fn, types = self._dali.fn, self._dali.types
        on_gpu = self.device.type == "cuda"
        size = self.image_size

        @self._dali.pipeline_def
        def pipe():
            encoded, flip = fn.readers.file(files=files, labels=flips, pad_last_batch=True,
                                            shard_id=0, num_shards=1, name="reader")
            images = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu",
                                       output_type=types.RGB)
            # subpixel_scale=False keeps DALI within 2/255 of PIL's bilinear resize (the default is up to 14 off).
            images = fn.resize(images, resize_shorter=size, antialias=True,
                               subpixel_scale=False, interp_type=types.INTERP_LINEAR)
            return fn.crop_mirror_normalize(
                images, crop=(size, size), crop_pos_x=0.5, crop_pos_y=0.5,
                mirror=fn.cast(flip[0], dtype=types.INT32), mean=[127.5] * 3,
                std=[127.5] * 3, dtype=types.FLOAT, output_layout="HWC")

        device_id = (self.device.index or 0) if on_gpu else None
        pipeline = pipe(batch_size=batch_size or self.batch_size, num_threads=self.threads,
                        device_id=device_id, seed=self.seed)
        pipeline.build()
        return pipeline

    def _batches(self, plan: EpochPlan, start_batch: int) -> Iterator[torch.Tensor]:
        first = start_batch * plan.batch_size
        idx, flips = plan.indices[first:], plan.flips[first:]
        if len(idx) == 0:
            return
        files = [self.files[i] for i in idx.tolist()]
        pipeline = batches = None
        done = 0
        try:
            pipeline = self._pipeline(files, flips.astype(int).tolist())
            pytorch = self._dali.plugin.pytorch
            batches = pytorch.DALIGenericIterator(pipeline, ["images"], reader_name="reader",  # decodes first batches
                                                  last_batch_policy=pytorch.LastBatchPolicy.PARTIAL, auto_reset=False)
            for out in batches:
                done += 1  # NHWC storage viewed as NCHW; EpochLoader.__iter__ lays it out
                yield out[0]["images"].permute(0, 3, 1, 2).to(self.device)
        except RuntimeError as e:  # DALI's error names no file: find it among the batches in flight
            size = plan.batch_size
            bad = next((f for f in files[done * size:(done + 3) * size] if not self._decodes(f)), None)
            if bad is None:
                raise
            raise ValueError(f"DALI could not decode {bad}, which PIL reads: remove it, or use "
                             f"--loader torch") from e
        finally:
            del batches, pipeline

    def _decodes(self, file: str) -> bool:
        try:
            self._pipeline([file], [0], batch_size=1).run()
        except RuntimeError:
            return False
        return True
