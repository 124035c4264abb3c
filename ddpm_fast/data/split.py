"""The seeded 90/5/5 train/val/test split.

Each item is ranked by a hash of (split seed, its name) and the ranking is cut at 90% and 95%.
The counts are exact (train = floor(0.9 n), val = floor(0.05 n), test = the rest), the split does
not depend on the training seed or on where the folder lives, and adding a file moves at most
the items at the cut points rather than reshuffling everything.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

SPLITS = ("train", "val", "test", "all")
TRAIN_FRACTION = 0.9
VAL_FRACTION = 0.05


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def split_rank(keys: Sequence[str], seed: int = 0) -> list[int]:
    """Indices of `keys` ranked by the hash of (split seed, key): the order the cuts are made in."""
    return sorted(range(len(keys)), key=lambda i: (hashlib.sha1(f"{seed}\0{keys[i]}".encode()).digest(), keys[i], i))


def split_keys(keys: Sequence[str], split: str, seed: int = 0) -> list[int]:
    """Indices of `keys` in `split`, in the original order of `keys`."""
    check_split(split)
    if split == "all":
        return list(range(len(keys)))
    return sorted(cut(split_rank(keys, seed), split))


def cut(rank: list[int], split: str, min_train: int = 0) -> list[int]:
    """The part of a ranking that is `split`: the first 90% train (at least `min_train`), the next
    5% val (what is left, at most), the rest test."""
    n = len(rank)
    n_train = max(min_train, int(n * TRAIN_FRACTION))
    n_val = min(int(n * VAL_FRACTION), n - n_train)
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}[split]
    return rank[bounds[0]:bounds[1]]


def split_file_keys(files: Sequence[Path]) -> list[str]:
    """Files are keyed by their path relative to the folder that holds them all, without the
    extension: a copy of the data set elsewhere, or one converted to another format by
    `python -m ddpm_fast.prepare`, splits the same way."""
    paths = [Path(f) for f in files]
    base = Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else Path()
    return [p.relative_to(base).with_suffix("").as_posix() for p in paths]


def split_files(files: Sequence[Path], split: str, seed: int = 0) -> list[Path]:
    """The files of `split` ("train", "val", "test" or "all"), in their given (sorted) order."""
    return [files[i] for i in split_keys(split_file_keys(files), split, seed)]
