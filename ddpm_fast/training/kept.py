"""Kept checkpoints (--keep-checkpoints K, diffusers' --checkpoints_total_limit): besides
checkpoint.pt, the resume point, a run keeps the checkpoint of every --save-every step as
`checkpoints/step_<step>.pt`, the oldest deleted beyond K, so a run that went bad can go back
(`--resume RUN --from-step S`) and `sample`/`evaluate`/`export` can take any of them by path.

A kept checkpoint is a hard link to the checkpoint.pt just written (no copy, no extra disk:
checkpoint.pt is only ever replaced by a rename, never rewritten in place), made under a
temporary name and renamed, so it is whole or absent. "Oldest" is the oldest written, not the
lowest step: after a resume from an earlier step, the abandoned later steps go first. The one
just written is the newest, so with K >= 1 it is never the one deleted."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from ..files import atomic_path
from ..checkpoint import CHECKPOINT_NAME, resolve_checkpoint

KEPT_DIRNAME = "checkpoints"
_KEPT = re.compile(r"step_(\d+)\.pt")


def kept_path(run: Path, step: int) -> Path:
    return Path(run) / KEPT_DIRNAME / f"step_{step:07d}.pt"


def kept_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, path) of the run's kept checkpoints, oldest written first."""
    folder = Path(run) / KEPT_DIRNAME
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := _KEPT.fullmatch(p.name))]
    return sorted(found, key=lambda sp: (sp[1].stat().st_mtime_ns, sp[0]))


def keep_checkpoint(run: Path, step: int, limit: int) -> Path:
    """Keep the run's checkpoint.pt (just written, of `step`) as step `step`'s, then delete the
    oldest kept beyond `limit`."""
    dst = kept_path(run, step)
    _link(Path(run) / CHECKPOINT_NAME, dst)
    for _, old in kept_checkpoints(run)[:-limit]:
        old.unlink(missing_ok=True)
    return dst


def run_folder(checkpoint: Path) -> Path:
    """The run folder a checkpoint belongs to: its own folder, or for a kept one the run's."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == KEPT_DIRNAME else checkpoint.parent


def is_kept_of(checkpoint: Path, run: Path) -> bool:
    """Whether `checkpoint` is one of `run`'s kept checkpoints."""
    return Path(checkpoint).resolve().parent == (Path(run) / KEPT_DIRNAME).resolve()


def resume_point(run: str, from_step: int | None) -> Path:
    """The checkpoint `--resume RUN [--from-step S]` continues: RUN's checkpoint.pt (or RUN itself,
    a checkpoint file), or its kept checkpoint of step S."""
    if from_step is None:
        return resolve_checkpoint(run)
    if not Path(run).is_dir():
        raise ValueError(f"--from-step {from_step} takes a run folder in --resume, got {run}")
    path = kept_path(Path(run), from_step)
    if not path.is_file():
        have = sorted(s for s, _ in kept_checkpoints(Path(run)))
        raise ValueError(f"--from-step {from_step}: {run} keeps no checkpoint of step {from_step} ("
                         + (f"kept: {', '.join(map(str, have))}" if have else "none kept: train with "
                            "--keep-checkpoints K") + ")")
    return path


def keep_resume_point(run: Path, resuming: Path | None) -> Path | None:
    """Before a resume from one of the run's kept checkpoints overwrites checkpoint.pt, keep
    checkpoint.pt too when it is kept nowhere else (a later step than the one resumed, most
    often): going back never loses the newest good checkpoint. Returns what it kept, if anything."""
    latest = Path(run) / CHECKPOINT_NAME
    if resuming is None or not is_kept_of(resuming, run) or not latest.is_file() or latest.stat().st_nlink > 1:
        return None
    step = torch.load(latest, map_location="cpu", weights_only=True, mmap=True)["step"]
    if kept_path(run, step).exists():
        return None
    _link(latest, kept_path(run, step))
    return kept_path(run, step)


def _link(src: Path, dst: Path) -> None:
    """`dst` the same file as `src`, atomically; a copy (its mtime kept, which orders the kept
    checkpoints) on a file system without hard links."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
