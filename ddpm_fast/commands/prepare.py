"""`python -m ddpm_fast.prepare`: preprocess a raw image folder once.

    python -m ddpm_fast.prepare --data RAW --out DIR --image-size S [--workers N] [--cache]

--out writes DIR with every usable image of RAW resized and centre-cropped to S x S (PNG, same
layout); --cache builds the loader's uint8 cache (of DIR when --out is given, else of RAW), so
the first training epoch does not pay for it. Bad files are skipped and listed in a log.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from pathlib import Path

from ..data.cache import build_cache
from ..data.listing import state_dir, validate_images
from ..data.prepare_folder import write_processed


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.prepare", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="folder of raw images (recursive)")
    p.add_argument("--out", type=Path, help="write the resized, centre-cropped copy here")
    p.add_argument("--image-size", required=True, type=int, help="output side S in pixels")
    p.add_argument("--workers", type=int, default=None, help="parallel workers (default: all "
                   "CPU cores)")
    p.add_argument("--cache", action="store_true", help="also build the uint8 loader cache")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.image_size < 4:
        _parser().error(f"--image-size must be >= 4, got {args.image_size}")
    if args.out is None and not args.cache:
        _parser().error("nothing to do: give --out DIR and/or --cache")
    if args.workers is not None and args.workers < 1:
        _parser().error(f"--workers must be >= 1, got {args.workers}")
    try:
        return _prepare(args)
    except (OSError, ValueError) as e:  # missing/empty --data, unwritable --out, ...
        print(f"error: {e}", file=sys.stderr)
        return 2


def _prepare(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported below, with the log's location
        listing = validate_images(args.data)
    n_all = len(listing.files) + len(listing.skipped)
    print(f"{args.data}: {n_all} image files, {len(listing.files)} usable, "
          f"{len(listing.skipped)} skipped")
    if listing.skipped:
        for f, why in listing.skipped[:10]:
            print(f"  skipped {f}: {why}")
        if len(listing.skipped) > 10:
            print(f"  ... and {len(listing.skipped) - 10} more")
    cache_of = listing
    if args.out is not None:
        done = write_processed(listing, args.out, args.image_size, args.workers)
        log = state_dir(done.out) / "skipped-from-source.txt"
        shutil.copyfile(listing.log_path, log)
        print(f"wrote {done.written} images of {args.image_size}x{args.image_size} to "
              f"{done.out} in {done.seconds:.1f} s")
        cache_of = validate_images(done.out)
    else:
        log = listing.log_path
    print(f"skipped-file log: {log}")
    if args.cache:
        cache = build_cache(cache_of, args.image_size, workers=args.workers)
        how = (f"built in {cache.build_seconds:.1f} s" if cache.build_seconds
               else "already up to date")
        print(f"cache {cache.path}: {len(cache_of.files)} images, {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
