"""Class labels for class-conditional training: each image's class is its first directory level
under the data folder (`data/dogs/<breed>/*.jpg`), or for the embedded set what it depicts.

The split of a class-conditional run is stratified: each class is split 90/5/5 by the same
seeded hash rule as the plain split (split.py), with at least one training image per class, so
every class is trained on and the test split holds each class in proportion."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .listing import STATE_DIRNAME, EmptyDatasetError
from .split import cut, split_rank

EMBEDDED_CLASSES = ("face", "circle", "square", "triangle")


@dataclass(frozen=True)
class Classes:
    names: tuple[str, ...]
    labels: tuple[int, ...]  # one per file (or embedded image), indexing names

    def counts(self) -> dict[str, int]:
        return {name: self.labels.count(i) for i, name in enumerate(self.names)}


def folder_classes(root: str | os.PathLike, files: list[Path]) -> Classes:
    """The classes of `files` (the usable images under `root`) by their first directory level.
    A file directly under `root` has no class, and a class folder without one usable image has
    no examples: both are errors that name the file or folder."""
    root = Path(root)
    names = []
    for f in files:
        parts = f.relative_to(root).parts
        if len(parts) == 1:
            raise ValueError(f"--class-cond takes each image's class from its folder under --data, but {f} lies "
                             f"directly in {root}: move the images into one folder per class")
        names.append(parts[0])
    classes = tuple(sorted(set(names)))
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != STATE_DIRNAME)
    empty = [d for d in folders if d not in classes]
    if empty:
        raise EmptyDatasetError(f"class folder {root / empty[0]} holds no readable image (--class-cond)")
    index = {n: i for i, n in enumerate(classes)}
    return Classes(classes, tuple(index[n] for n in names))


def stratified_split(keys: list[str], labels: tuple[int, ...], split: str, seed: int = 0) -> list[int]:
    """Indices of `keys` in `split`, class by class, in the original order of `keys`."""
    if split == "all":
        return list(range(len(keys)))
    chosen: list[int] = []
    for c in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == c]
        chosen += cut([members[j] for j in split_rank([keys[i] for i in members], seed)], split, min_train=1)
    return sorted(chosen)
