"""Data-loading throughput: images per second of each loader backend for one 64x64 epoch.

    python -m benchmarks.data_loading [--data DIR] [--n 57208] [--quick]

Without --data it writes (once, reused) a folder of 96x96 JPEG sources drawn procedurally,
sized so that its 90% train split holds --n images (57,208 of 63,565, as the anime-face set;
docs/DESIGN.md). Each backend runs a warm-up (worker start, cache build, first batches), then one
full train epoch is timed; the cache build is reported apart, as a one-time cost. A plain
PIL + DataLoader loader with 8 and 16 workers, decoding and normalising in the workers as
a straightforward training script does, is the baseline. Prints a table and writes JSON to
$OUT (when set) or benchmarks/results/.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ddpm_fast.argtypes import non_negative_int, positive_int
from ddpm_fast.data import build_loader, embedded_images, list_images, split_files
from ddpm_fast.data.build import dali_installed
from ddpm_fast.data.listing import validate_images

from . import report_parts
from .common import DEVICE, ON_GPU, device_name, timed, write_result

SOURCE_SIZE = 96
BASE_IMAGES = 4096  # distinct drawings; more files reuse them shifted by a few pixels


def folder_size_for_epoch(n_train: int) -> int:
    """Smallest folder whose 90% train split holds at least n_train images."""
    total = math.ceil(n_train / 0.9)
    while int(total * 0.9) < n_train:
        total += 1
    return total


def make_sources(folder: Path, total: int) -> Path:
    """Write `total` 96x96 JPEGs into folder (kept between runs when complete)."""
    marker = folder / "COMPLETE"
    if marker.exists() and marker.read_text() == str(total):
        return folder
    base = embedded_images(min(total, BASE_IMAGES), SOURCE_SIZE, seed=123).numpy()
    for d in range(0, total, 1000):
        (folder / f"{d // 1000:03d}").mkdir(parents=True, exist_ok=True)

    def write(i: int) -> None:
        Image.fromarray(np.roll(base[i % len(base)], i // len(base), axis=1)).save(
            folder / f"{i // 1000:03d}" / f"{i:06d}.jpg", format="JPEG", quality=90)
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # PIL encodes with the GIL released
        list(pool.map(write, range(total)))
    marker.write_text(str(total))
    return folder


class _PlainDataset(Dataset):
    """The baseline: decode, resize, crop, flip and normalise to float in the worker."""

    def __init__(self, files: list[Path], size: int) -> None:
        self.files, self.size = [str(f) for f in files], size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = Image.open(self.files[i]).convert("RGB")
        w, h = img.size
        s = self.size / min(w, h)
        img = img.resize((max(self.size, round(w * s)), max(self.size, round(h * s))),
                         Image.Resampling.BILINEAR)
        left, top = (img.width - self.size) // 2, (img.height - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        if torch.rand(()) < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
        return x / 127.5 - 1.0


def time_epoch(name: str, backend: str, loader, to_device, setup_s: float = 0.0, build_s: float = 0.0) -> dict:
    """Warm up on a few batches of epoch 0 (workers start, pipelines build, the page cache fills),
    then time all of epoch 1."""
    for i, _ in enumerate(loader):
        if i + 1 >= min(10, len(loader) - 1):
            break
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(1)
    images, seconds = timed(lambda: sum(to_device(x).shape[0] for x in loader))
    return {"name": name, "backend": backend, "images": images, "epoch_s": seconds, "img_per_s": images / seconds,
            "setup_s": setup_s, "cache_build_s": build_s}


def bench_backend(name: str, root: Path, args) -> dict:
    loader, setup = timed(lambda: build_loader(root, args.image_size, args.batch_size, backend=name, device=DEVICE,
                                               num_workers=args.workers))
    return time_epoch(name, loader.backend, loader, lambda x: x, setup, loader.build_seconds)


def bench_baseline(workers: int, files: list[Path], args) -> dict:
    dl = DataLoader(_PlainDataset(files, args.image_size), batch_size=args.batch_size, shuffle=True, drop_last=True,
                    num_workers=workers, pin_memory=ON_GPU, persistent_workers=True)
    return time_epoch(f"baseline-pil-{workers}w", "baseline", dl, lambda x: x.to(DEVICE, non_blocking=True))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_loading", description=__doc__)
    p.add_argument("--data", type=Path, help="image folder (default: generated 96x96 JPEGs)")
    p.add_argument("--n", type=positive_int, default=57208, help="train-split images (one epoch)")
    p.add_argument("--quick", action="store_true", help="small smoke run: --n 512, few workers")
    p.add_argument("--image-size", type=positive_int, default=64)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--workers", type=non_negative_int, default=None, help="workers of our torch/dali/cache "
                   "loaders (default: their own)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where generated sources go (default: $TMPDIR/ddpm_fast_bench)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.quick and args.n == 57208:
        args.n = 512

    if args.data is None:
        total = folder_size_for_epoch(args.n)
        base = args.workdir or Path(os.environ.get("TMPDIR", "/tmp")) / "ddpm_fast_bench"
        root, seconds = timed(lambda: make_sources(base / f"jpeg{SOURCE_SIZE}-{total}", total))
        print(f"sources: {total} JPEGs of {SOURCE_SIZE}x{SOURCE_SIZE} in {root} ({seconds:.1f} s)")
    else:
        root = args.data
    files, seconds = timed(lambda: split_files(validate_images(root).files, "train"))
    print(f"validated listing: {len(list_images(root))} files, train split {len(files)} ({seconds:.1f} s)")

    backends = ["torch", "cache"] + (["dali"] if dali_installed() else [])
    baseline_workers = [min(2, os.cpu_count() or 1)] if args.quick else [8, 16]
    results = []
    for name in backends:
        print(f"... {name}", flush=True)
        results.append(bench_backend(name, root, args))
    for w in baseline_workers:
        print(f"... baseline with {w} workers", flush=True)
        results.append(bench_baseline(w, files, args))

    report = {
        "benchmark": "data_loading", "device": device_name() if ON_GPU else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__, "python": platform.python_version(),
        "image_size": args.image_size, "batch_size": args.batch_size, "source_size":
        SOURCE_SIZE if args.data is None else None, "train_images": len(files),
        "data": str(root), "results": results,
    }
    print("\n" + report_parts.loading(report, {}))
    tag = "quick" if args.quick else ("cuda" if ON_GPU else "cpu")
    print(f"\nwrote {write_result(f'data_loading-{tag}', report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
