"""`folder_lock`: one writer at a time for a folder, through an `flock` on a lock file beside it.

The lock file is `.<name>.lock` in the folder's parent, so the folder itself holds only what
its writer puts there (an artifact folder stays a flat folder of its own files, which the
board transfer sends whole), and a writer that replaces the folder whole keeps its lock. The
lock file is left in place afterwards: deleting it would let a third writer lock a new file
while a second one still holds the old. The kernel drops the lock when its holder exits, even
on SIGKILL, so no stale lock ever needs clearing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path

from .errors import FolderBusyError

_held: dict[tuple[str, int], int] = {}  # (lock file, thread) -> depth: re-entrant within one thread
_held_guard = threading.Lock()


def lock_path(folder: str | Path) -> Path:
    """The lock file of `folder`: `.<name>.lock` beside it (symlinks resolved)."""
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def folder_lock(folder: str | Path, wait: bool = False, what: str = "folder"):
    """Hold the exclusive lock of `folder` while the block runs (the folder's parent must exist).

    Another process, or another thread of this one, is refused (or waits, with `wait=True`); the
    thread that holds it may take it again (an export inside a caller that locked the same folder).

    Args:
        folder: the folder to write. wait: block until the lock is free instead of refusing.
        what: how errors name the folder ("output folder", "checkpoint folder").
    Raises:
        FolderBusyError: `wait` is False and another writer holds the lock, naming the folder
            and the lock file.
        PermissionError: the lock file cannot be created (naming it).
    """
    path = lock_path(folder)
    key = (str(path), threading.get_ident())
    with _held_guard:
        if key in _held:
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield path
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError as e:
        raise PermissionError(f"cannot lock {what} {str(folder)!r}: cannot create {str(path)!r} ({e.strerror})") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise FolderBusyError(f"{what} {str(folder)!r} is being written by another process or thread (it holds "
                                  f"{str(path)!r}); wait until it has finished, or choose another folder") from None
        with _held_guard:
            _held[key] = 1
        try:
            yield path
        finally:
            with _held_guard:
                del _held[key]
    finally:
        os.close(fd)  # closing the last descriptor releases the flock
