"""Recursive image listing, its fingerprint, and one-time validation of every file.

Every backend trains on the same validated list: a file that cannot be decoded is found here,
before an epoch starts, so no loader meets it mid-epoch. The verdicts are stored keyed by the
listing's fingerprint, so later runs over an unchanged folder decode nothing."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import atomic_write

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
# What a file is, by its magic bytes (PIL's format), not its name: the formats every loader
# decodes (DALI's decoder, too, detects the format from the content). MPO is a camera JPEG with
# extra frames, a plain JPEG to every decoder. A GIF or TIFF renamed .png is skipped here rather
# than stopping a DALI pipeline mid-epoch.
DECODABLE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP"})
# Bumped when check_image's verdicts change, so records of older checks are not trusted
# (3: the record also says whether every image is greyscale).
CHECK_VERSION = 3
# Larger images are skipped: decoding one would take seconds and gigabytes (PIL's own
# decompression-bomb limit is about 179M pixels; anything near it is not a training image).
MAX_PIXELS = 8192 * 8192
STATE_DIRNAME = ".ddpm_fast"
# PIL modes with one intensity channel (and maybe alpha, which every loader drops): greyscale
# whatever the pixels. Any other mode is greyscale when its RGB conversion has R = G = B everywhere.
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


class EmptyDatasetError(ValueError):
    """A data folder holds no usable image."""


def list_images(root: str | os.PathLike) -> list[Path]:
    """All image files under `root` (recursive, extension case-insensitive; not the state folder), sorted."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data folder not found: {root} (check --data)")
    if not root.is_dir():
        raise NotADirectoryError(f"--data must be a folder of images, got a file: {root}")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != STATE_DIRNAME)
        for name in filenames:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                files.append(Path(dirpath) / name)
    files.sort()
    if not files:
        raise EmptyDatasetError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under --data {root}")
    return files


def fingerprint(root: Path, files: list[Path]) -> str:
    """Hash of the listing: relative paths, sizes and mtimes. Changes when a file is added,
    removed, replaced or touched, which is what invalidates validation results and caches."""
    h = hashlib.sha256()
    for f in files:
        try:
            st = f.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        h.update(f"{f.relative_to(root).as_posix()}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def state_dir(root: Path) -> Path:
    """Where caches and logs for `root` live: `<root>/.ddpm_fast`, or, when the data folder is
    read-only, a per-folder directory under $DDPM_FAST_CACHE (default ~/.cache/ddpm_fast)."""
    preferred = Path(root) / STATE_DIRNAME
    try:
        preferred.mkdir(exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    base = Path(os.environ.get("DDPM_FAST_CACHE", Path.home() / ".cache" / "ddpm_fast"))
    fallback = base / hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:16]
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def is_grey(im: Image.Image) -> bool:
    """Whether a decoded image is greyscale as the loaders see it: R = G = B in every pixel of its
    RGB conversion (exact: a JPEG's chroma noise of one level makes it colour)."""
    if im.mode in GREY_MODES:
        return True
    rgb = np.asarray(im.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def check_image(path: Path, max_pixels: int = MAX_PIXELS) -> tuple[str | None, bool]:
    """(None when `path` decodes fully as an image, else why it does not; whether it is greyscale).
    The grey check rides on the decode validation does anyway, so a folder's channel count
    (--channels auto) costs no second pass."""
    try:
        if path.stat().st_size == 0:
            return "zero-byte file", False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.format not in DECODABLE_FORMATS:
                    return (f"{im.format} data in a {path.suffix} file (the loaders decode "
                            f"{', '.join(sorted(DECODABLE_FORMATS - {'MPO'}))})"), False
                w, h = im.size
                if w * h > max_pixels:
                    return f"too large ({w}x{h} pixels, limit {max_pixels})", False
                if w == 0 or h == 0:
                    return f"empty image ({w}x{h})", False
                im.load()
                return None, is_grey(im)
    except PermissionError as e:
        return f"unreadable: {e.strerror or e}", False
    except Image.DecompressionBombError:
        return "too large (PIL decompression-bomb limit)", False
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return f"cannot decode: {type(e).__name__}: {e}", False


@dataclass
class ValidatedListing:
    """The usable files of a data folder and the ones skipped, with why."""

    root: Path
    files: list[Path]
    fingerprint: str
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    log_path: Path | None = None
    colour_example: Path | None = None  # a usable file that is not greyscale; None: every one is

    @property
    def greyscale(self) -> bool:
        """Whether every usable file is greyscale (R = G = B in every pixel)."""
        return self.colour_example is None


def validate_images(root: str | os.PathLike, max_pixels: int = MAX_PIXELS, strict: bool = False) -> ValidatedListing:
    """List `root` and keep the files that decode. Bad files are skipped with a warning and
    written to `<state dir>/skipped.txt`; with `strict=True` the first one raises a ValueError
    naming it instead."""
    root = Path(root)
    files = list_images(root)
    fp = fingerprint(root, files)
    sdir = state_dir(root)
    record = sdir / f"validated-v{CHECK_VERSION}-{max_pixels}.json"
    rel = {f: f.relative_to(root).as_posix() for f in files}
    try:
        saved = json.loads(record.read_text())
        bad, colour = (dict(saved["skipped"]), saved["colour"]) if saved.get("fingerprint") == fp else (None, None)
    except (OSError, ValueError, KeyError, TypeError):
        bad = None
    if bad is None:
        # PIL releases the GIL while decoding, so threads scale without pickling.
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            verdicts = list(pool.map(lambda f: check_image(f, max_pixels), files))
        bad = {rel[f]: why for f, (why, _) in zip(files, verdicts) if why}
        colour = next((rel[f] for f, (why, grey) in zip(files, verdicts) if not why and not grey), None)
        atomic_write(record, json.dumps({"fingerprint": fp, "skipped": [[r, why] for r, why in bad.items()],
                                         "colour": colour}))
    skipped = [(f, bad[rel[f]]) for f in files if rel[f] in bad]
    log_path = sdir / "skipped.txt"
    atomic_write(log_path, "".join(f"{f}\t{why}\n" for f, why in skipped))
    if skipped:
        if strict:
            f, why = skipped[0]
            raise ValueError(f"bad image file {f}: {why} ({len(skipped)} bad files in --data)")
        shown = "; ".join(f"{f.name}: {why}" for f, why in skipped[:3])
        warnings.warn(f"skipped {len(skipped)} of {len(files)} files under {root} that are not usable "
                      f"images ({shown}{'; ...' if len(skipped) > 3 else ''}); full list in {log_path}", stacklevel=2)
    good = [f for f in files if rel[f] not in bad]
    if not good:
        raise EmptyDatasetError(f"none of the {len(files)} image files under --data {root} "
                                f"could be decoded; see {log_path}")
    return ValidatedListing(root, good, fp, skipped, log_path, None if colour is None else root / colour)

