"""Write a processed copy of a data folder: every usable image resized and centre-cropped to
S x S, as PNG (lossless, so the copy adds no second JPEG loss), keeping the folder layout.

Processes rather than threads: PNG encoding holds the GIL for part of its work. A file's output
name keeps its stem, so the 90/5/5 split of the copy equals the split of the source.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..images import save_image
from .listing import ValidatedListing
from .transforms import load_uint8


@dataclass
class PreparedFolder:
    out: Path
    written: int
    seconds: float


def output_names(listing: ValidatedListing) -> list[Path]:
    """Relative output paths: `<stem>.png`, or `<stem>_<ext>.png` where two sources in one
    folder share a stem (a.jpg and a.png)."""
    rels = [f.relative_to(listing.root) for f in listing.files]
    plain = [r.with_suffix(".png") for r in rels]
    counts = Counter(plain)
    return [p if counts[p] == 1 else r.with_name(f"{r.stem}_{r.suffix[1:].lower()}.png")
            for r, p in zip(rels, plain)]


def _write_one(job: tuple[str, str, int]) -> None:
    src, dst, size = job
    save_image(Image.fromarray(load_uint8(src, size)), dst, compress_level=1)


def write_processed(listing: ValidatedListing, out: Path, image_size: int,
                    workers: int | None = None) -> PreparedFolder:
    start = time.perf_counter()
    out = Path(out)
    if out.resolve() == listing.root.resolve():
        raise ValueError(f"--out {out} must differ from --data")
    names = output_names(listing)
    for d in {out / n.parent for n in names}:
        d.mkdir(parents=True, exist_ok=True)
    jobs = [(str(f), str(out / n), image_size) for f, n in zip(listing.files, names)]
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or len(jobs) <= workers:
        for job in jobs:
            _write_one(job)
    else:
        with mp.Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_one, jobs, chunksize=32):
                pass
    return PreparedFolder(out, len(jobs), time.perf_counter() - start)
