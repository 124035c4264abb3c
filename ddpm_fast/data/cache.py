"""The `cache` backend: decode and preprocess once into a memory-mapped uint8 NHWC file.

File layout: a 4096-byte header (magic line, then JSON: format version, image size, count and
the fingerprint of the source listing), then count x S x S x 3 bytes in the order of the
validated file list. A cache whose header does not match the current listing (a file added,
removed or touched) is rebuilt. Building is a one-time cost, timed and reported apart from
epoch time (docs/DESIGN.md); it decodes in parallel threads and is written under a temporary
name and renamed, so concurrent builders (one per rank) never see a half-written file.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import atomic_path
from .listing import ValidatedListing, state_dir
from .transforms import load_uint8

log = logging.getLogger("ddpm_fast.data")

MAGIC = b"DDPM-FAST-CACHE\n"
HEADER_BYTES = 4096
VERSION = 2  # 2: images upright by their EXIF orientation (a version-1 cache is rebuilt)


@dataclass
class ImageCache:
    """An opened cache: `images` is a copy-on-write memory map (N, S, S, 3) uint8."""

    path: Path
    images: np.ndarray
    build_seconds: float  # 0.0 when an existing cache was reused


def _read_header(path: Path) -> dict | None:
    """The header's fields, None when `path` is not a cache file."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) == HEADER_BYTES and head.startswith(MAGIC):
            return json.loads(head[len(MAGIC):].rstrip(b" \0").decode())
    except (OSError, ValueError):
        pass
    return None


def _open(path: Path, header: dict, build_seconds: float) -> ImageCache:
    n, s = header["count"], header["image_size"]
    expected = HEADER_BYTES + n * s * s * 3
    if path.stat().st_size != expected:
        raise ValueError(f"cache file {path} has {path.stat().st_size} bytes, header says "
                         f"{expected}; delete it to rebuild")
    images = np.memmap(path, dtype=np.uint8, mode="c", offset=HEADER_BYTES, shape=(n, s, s, 3))
    return ImageCache(path, images, build_seconds)


def build_cache(listing: ValidatedListing, image_size: int, workers: int | None = None) -> ImageCache:
    """Open the cache of `listing` at `image_size`, building it first when missing or stale."""
    path = state_dir(listing.root) / f"cache-{image_size}.ddpmcache"
    n = len(listing.files)
    header = {"version": VERSION, "image_size": image_size, "count": n, "fingerprint": listing.fingerprint}
    if _read_header(path) == header:
        return _open(path, header, 0.0)
    start = time.perf_counter()
    size = HEADER_BYTES + n * image_size * image_size * 3
    with atomic_path(path, size) as tmp:
        with open(tmp, "wb") as f:
            f.write((MAGIC + json.dumps(header).encode()).ljust(HEADER_BYTES, b" "))  # a few fields: it fits
            # Allocated now, not as the memory map fills it: a full disk is then an ENOSPC here
            # rather than a SIGBUS that kills the process part way.
            os.posix_fallocate(f.fileno(), 0, size)
        out = np.memmap(tmp, dtype=np.uint8, mode="r+", offset=HEADER_BYTES,
                        shape=(n, image_size, image_size, 3))
        # PIL releases the GIL in decode and resize, so threads scale without forking a
        # process that holds torch (and maybe CUDA) state.
        with ThreadPoolExecutor(workers or min(16, os.cpu_count() or 1)) as pool:
            for i, arr in enumerate(pool.map(load_uint8, map(str, listing.files), itertools.repeat(image_size))):
                out[i] = arr
        out.flush()
        del out
    seconds = time.perf_counter() - start
    log.info("built image cache %s: %d images at %dx%d in %.1f s (one-time cost)",
             path, n, image_size, image_size, seconds)
    return _open(path, header, seconds)
