"""The one atomic write: every file a run keeps (checkpoints, caches, validation records) is
written to a temporary file beside its target, flushed to disk, then renamed onto it, so a kill
or a full disk never leaves a torn file that a later run would trust."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path`, for the block to write; renamed onto `path` when the block
    succeeds, removed when it fails (the old file, if any, stays as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.strerror:  # a full disk, a read-only folder: name the file meant
            raise OSError(e.errno, f"could not write {path}: {e.strerror} ({path.name} is as it was)") from e
        raise


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Remove the temporary files of writes that a kill cut short in `folder` (atomic_path's
    own cleanup never ran); only while no one else writes there. Returns what it removed."""
    stale = sorted(folder.glob(f"*.*{TMP_SUFFIX}"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
