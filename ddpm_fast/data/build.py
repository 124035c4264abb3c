"""`build_loader` and `load_images`: the data API the trainer and evaluator call.

Backends: "torch" (DataLoader + PIL), "cache" (decoded once to a memory-mapped file, then held
in device memory when it fits), "dali" (NVIDIA DALI), "auto" (cache when the split fits in
device memory, on a CPU in RAM; else DALI when installed and on a GPU; else torch). `root=None`
is the embedded procedural data set, held in memory.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .cache import build_cache
from .embedded import EMBEDDED_SIZE, embedded_images, embedded_labels, embedded_split_indices
from .labels import EMBEDDED_CLASSES, folder_classes, stratified_split
from .listing import validate_images
from .order import EpochLoader
from .split import check_split, split_file_keys, split_files
from .tensor_loader import TensorLoader
from .torch_loader import TorchFileLoader
from ..plan import resolve_device
from .transforms import load_uint8, to_channels

log = logging.getLogger("ddpm_fast.data")

BACKENDS = ("auto", "torch", "cache", "dali")
# Share of free device memory (RAM on a CPU) the cached split may take; the rest is for the
# model, activations and the optimiser.
CACHE_MEMORY_FRACTION = 0.5


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # MemAvailable counts the page cache the kernel would hand back; free pages alone do not
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def cache_fits(num_images: int, image_size: int, device: torch.device) -> bool:
    """Whether `num_images` uint8 images fit in the device's memory budget for the cache."""
    need = num_images * image_size * image_size * 3
    return need <= CACHE_MEMORY_FRACTION * _free_bytes(device)


def dali_installed() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def data_channels(root: str | os.PathLike | None) -> int:
    """1 when every image of the folder `root` is greyscale (R = G = B in every pixel, or a grey
    PIL mode; validation's record says so, no second decode), else 3; the embedded set is in colour."""
    return 1 if root is not None and validate_images(root).greyscale else 3


def _split_of(root, split: str, seed: int, class_cond: bool):
    """(listing, the split's files, their labels, the class names); for the embedded set
    (root None) the files are indices. Without class_cond the labels and names are None."""
    check_split(split)
    if root is None:
        idx = embedded_split_indices(split, EMBEDDED_SIZE, seed, stratified=class_cond)
        labels = [embedded_labels(EMBEDDED_SIZE)[i] for i in idx] if class_cond else None  # cached
        return None, idx, labels, EMBEDDED_CLASSES if class_cond else None
    listing = validate_images(root)
    if class_cond:
        classes = folder_classes(root, listing.files)
        idx = stratified_split(split_file_keys(listing.files), classes.labels, split, seed)
        chosen, labels, names = [listing.files[i] for i in idx], [classes.labels[i] for i in idx], classes.names
    else:
        chosen, labels, names = split_files(listing.files, split, seed), None, None
    if not chosen:
        raise ValueError(f"the {split} split of {len(listing.files)} images is empty; add images")
    return listing, chosen, labels, names


def build_loader(root: str | os.PathLike | None, image_size: int, batch_size: int,
                 split: str = "train", backend: str = "auto",
                 device: str | torch.device | None = None, seed: int = 0,
                 drop_last: bool = True, rank: int = 0, world_size: int = 1,
                 num_workers: int | None = None, split_seed: int = 0, flip: bool = True,
                 class_cond: bool = False, channels: int = 3,
                 memory_format: torch.memory_format = torch.contiguous_format) -> EpochLoader:
    """A loader of float (B, C, S, S) batches in [-1, 1] on `device`, laid out in `memory_format`
    (the trainer passes its ExecutionPlan's), C = `channels`: 3 (RGB) or 1 (the luma; a greyscale
    image's own value).

    The train split is shuffled and (unless flip=False) randomly mirrored; other splits come in a
    fixed order without flips. The order of an epoch is a pure function of (seed, epoch, rank,
    world_size); `loader.set_epoch(e, start_batch)` resumes at an exact batch. Each rank gets
    a disjoint shard of the split and `batch_size` images per batch. `split_seed` fixes the
    90/5/5 split independently of the training `seed`. `root=None` (the embedded set) is
    always held in memory, whatever `backend` says. With `class_cond` the split is stratified by
    class (labels.py) and the loader yields (images, labels) with `loader.class_names`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown data loader backend {backend!r} (--loader); "
                         f"expected one of {', '.join(BACKENDS)}")
    if image_size < 4:
        raise ValueError(f"image size must be >= 4, got {image_size} (--image-size)")
    device = resolve_device(device)
    # what every backend passes on to EpochLoader
    order = dict(device=device, seed=seed, shuffle=split == "train", flip=flip and split == "train",
                 drop_last=drop_last, rank=rank, world_size=world_size, channels=channels,
                 memory_format=memory_format)
    listing, files, labels, names = _split_of(root, split, split_seed, class_cond)
    if root is None:
        images = embedded_images(EMBEDDED_SIZE, image_size).index_select(0, torch.tensor(files)).to(device)
        loader = TensorLoader(images, batch_size, backend="memory", **order)
    else:
        loader = _file_loader(listing, files, image_size, batch_size, backend, num_workers, order)
    if labels is not None:
        loader.labels = torch.tensor(labels, dtype=torch.long, device=device)
        loader.class_names = names
    return loader


def _file_loader(listing, files, image_size: int, batch_size: int, backend: str, num_workers: int | None,
                 order: dict) -> EpochLoader:
    device = order["device"]
    if backend == "auto":
        if cache_fits(len(files), image_size, device):
            backend = "cache"
        elif device.type == "cuda" and dali_installed():
            backend = "dali"
        else:
            backend = "torch"
        log.info("data loader backend: %s (auto)", backend)

    if backend == "torch":
        return TorchFileLoader(files, image_size, batch_size, num_workers=num_workers, **order)
    if backend == "dali":
        from .dali_loader import DaliLoader
        return DaliLoader(files, image_size, batch_size, num_workers=num_workers, **order)

    cache = build_cache(listing, image_size, workers=num_workers)
    position = {f: i for i, f in enumerate(listing.files)}
    rows = torch.tensor([position[f] for f in files], dtype=torch.long)
    host = torch.from_numpy(cache.images)
    if cache_fits(len(files), image_size, device):
        images = host.index_select(0, rows).to(device)
        rows_on_host = None
    else:
        log.warning("%d images at %d px do not fit in %s memory; the cache backend reads batches "
                    "from the memory-mapped file %s", len(files), image_size, device, cache.path)
        images, rows_on_host = host, rows
    loader = TensorLoader(images, batch_size, backend="cache", rows=rows_on_host, **order)
    loader.build_seconds = cache.build_seconds
    return loader


def load_images(root: str | os.PathLike | None, image_size: int, split: str = "test",
                limit: int | None = None, split_seed: int = 0, channels: int = 3) -> torch.Tensor:
    """The images of `split` as float (N, C, S, S) in [-1, 1] on the CPU (C = `channels`, as
    build_loader's), unflipped, in a fixed order (sorted paths; embedded index order), at most
    `limit` of them."""
    return load_labelled(root, image_size, split, limit, split_seed, class_cond=False, channels=channels)[0]


def load_labelled(root: str | os.PathLike | None, image_size: int, split: str = "test", limit: int | None = None,
                  split_seed: int = 0, class_cond: bool = True,
                  channels: int = 3) -> tuple[torch.Tensor, torch.Tensor | None, tuple | None]:
    """(images as load_images gives them, their class labels, the class names) of the stratified
    split of a class-conditional run; labels and names are None without class_cond."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    _, files, labels, names = _split_of(root, split, split_seed, class_cond)
    return _load(root, files[:limit], image_size, channels), \
        None if labels is None else torch.tensor(labels[:limit], dtype=torch.long), names


def load_sample(root: str | os.PathLike | None, image_size: int, n: int, split: str = "train", seed: int = 0,
                split_seed: int = 0, channels: int = 3, class_cond: bool = False) -> torch.Tensor:
    """n images of `split` (all of them if fewer; the stratified split of a class-conditional run)
    drawn at random by `seed`, as load_images gives them: a sample of a folder whose sorted order
    may run class by class."""
    _, files, _, _ = _split_of(root, split, split_seed, class_cond)
    pick = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return _load(root, [files[i] for i in pick.tolist()], image_size, channels)


def _load(root, files: list, image_size: int, channels: int) -> torch.Tensor:
    if root is None:
        nhwc = embedded_images(EMBEDDED_SIZE, image_size).index_select(0, torch.tensor(files))
    else:
        workers = min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:
            arrays = list(pool.map(lambda f: load_uint8(f, image_size), files))
        nhwc = torch.from_numpy(np.stack(arrays))
    return to_channels(nhwc.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0), channels).contiguous()
