"""One run per folder. A run folder holds one run: a new run refuses a folder that holds a
checkpoint, a resume refuses one that holds another run's, and while a run writes its folder it
holds the folder's lock (LOCK_NAME: an flock, so the kernel releases it when the process dies,
however it dies; the file names the holder's pid)."""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path
from typing import Iterator

from ..files import remove_stale_tmp
from ..checkpoint import CHECKPOINT_NAME
from .kept import KEPT_DIRNAME, is_kept_of

LOCK_NAME = "train.lock"


def check_out(out: Path, resuming: Path | None) -> None:
    """Refuse an --out that holds a run other than the one being resumed from `resuming`."""
    held = out / CHECKPOINT_NAME
    if not held.exists():
        return
    if resuming is None:
        raise FileExistsError(f"--out {out} already holds a run: pass --resume to continue it, or another --out")
    if held.resolve() != resuming.resolve() and not is_kept_of(resuming, out):
        raise FileExistsError(f"--out {out} holds another run than {resuming}, which --resume continues: "
                              f"pick an --out without a checkpoint")


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[str | None]:
    """Hold `folder`'s lock for the block (creating the folder); FileExistsError naming the
    holder's pid when another process holds it. Yields the pid a dead holder left in the lock
    file (a stale lock, now taken over), or None."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FileExistsError(f"--out {folder} is in use by another training (pid {holder}, {path}): "
                                  f"wait for it to finish, or pick another --out") from None
        # The previous holder unlinks the file on its way out: a lock on an unlinked file locks nothing.
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        os.close(fd)
    try:
        stale = os.read(fd, 64).decode(errors="replace").strip() or None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield stale
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


@contextlib.contextmanager
def claim(out: Path, resuming: Path | None) -> Iterator[None]:
    """The run folder, locked for this run: checked again under the lock (another run may have
    finished there since), and cleared of the temporary files of writes a kill cut short. A
    folder this run created is removed again if the run fails before its first checkpoint."""
    created = not out.exists()
    with locked(out) as stale:
        if stale:
            print(f"took over the lock of process {stale} in {out}, which is no longer running", flush=True)
        check_out(out, resuming)
        removed = remove_stale_tmp(out) + remove_stale_tmp(out / KEPT_DIRNAME)
        if removed:
            print(f"removed {len(removed)} temporary file(s) of an interrupted write: "
                  f"{', '.join(p.name for p in removed)}", flush=True)
        try:
            yield
        except BaseException:
            if created and not (out / CHECKPOINT_NAME).exists():
                shutil.rmtree(out, ignore_errors=True)
            raise
