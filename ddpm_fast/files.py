"""The one atomic write: every file the commands keep (checkpoints, caches, validation records,
sample images, exports) is written to a temporary file beside its target, flushed to disk, then
renamed onto it, so a kill or a full disk never leaves a torn or empty file that a later run
would trust. A failed write is one OSError naming the file, and on a full disk the bytes it
needed and the bytes free."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, size: int | None = None) -> Iterator[Path]:
    """A temporary path beside `path`, for the block to write; renamed onto `path` when the block
    succeeds, removed when it fails (the old file, if any, stays as it was). `size`: about how
    many bytes the block writes, for the message of a full disk."""
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
        failed = write_error(e)
        if failed is not None:  # a full disk, a read-only folder: name the file meant
            raise write_failure(failed, path, size, f"{path.name} is as it was") from e
        raise


def write_error(e: BaseException) -> OSError | None:
    """The OSError behind a failed write: `e`, or the one a library chained (torch.save reports
    a failed write as a RuntimeError from its zip writer, raised while handling the OSError)."""
    while e is not None:
        if isinstance(e, OSError) and e.strerror:
            return e
        e = e.__cause__ or e.__context__
    return None


def write_failure(e: OSError, path: Path, size: int | None, kept: str) -> OSError:
    """One line for a write to `path` that failed with `e`: the file, the reason, and on a full
    disk the bytes needed and free; `kept` says what stayed as it was."""
    space = ""
    if e.errno == errno.ENOSPC:
        free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
        space = (f"{size:,} bytes needed, " if size else "") + f"{free:,} free; "
    return OSError(e.errno, f"could not write {path}: {e.strerror} ({space}{kept})")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, size: int | None = None) -> Iterator[Path]:
    """A temporary folder beside `path`, for the block to fill; swapped in for `path` (a folder,
    or nothing yet) when the block succeeds, removed when it fails: `path` is then as it was.
    The swap is two renames: between them, for an instant, `path` is absent, never partial."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".", suffix=TMP_SUFFIX))
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        failed = write_error(e)
        if failed is not None:
            raise write_failure(failed, path, size, f"{path.name} is as it was") from e
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".old.", suffix=TMP_SUFFIX))
        os.replace(path, old)  # onto the empty folder mkdtemp made
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old)


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Remove the temporary files of writes that a kill cut short in `folder` (atomic_path's
    own cleanup never ran); only while no one else writes there. Returns what it removed."""
    stale = sorted(folder.glob(f"*.*{TMP_SUFFIX}"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    data = data.encode() if isinstance(data, str) else data
    with atomic_path(path, len(data)) as tmp:
        tmp.write_bytes(data)

