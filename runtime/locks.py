"""One writer at a time per folder, through an `flock` on a lock file: `folder_lock` and `FolderLock`.

Two places for the lock file, by what the folder is:

- `folder_lock(folder)`: `.<name>.lock` in the folder's *parent*, so the folder holds only what
  its writer puts there (an artifact folder stays a flat folder of its own files, which the
  board transfer sends whole) and a writer that replaces the folder whole keeps its lock;
- `FolderLock(folder)`: `folder/.lock` *inside* it, for a folder that lives as long as its
  writer's run (checkpoints), whose parent may not be writable.

A lock file is left in place afterwards: deleting it would let a third writer lock a new file
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

LOCK_NAME = ".lock"  # FolderLock's file inside the folder
_held: dict[tuple[str, int], int] = {}  # (lock file, thread) -> depth: folder_lock is re-entrant within one thread
_held_guard = threading.Lock()


def _acquire(path: Path, wait: bool, busy_message: str) -> int:
    """Open `path` and take its exclusive flock; the open descriptor holds it.

    Raises:
        FolderBusyError: `wait` is False and another descriptor holds the lock (`busy_message`).
        OSError: the lock file cannot be created.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        raise FolderBusyError(busy_message) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _adopt(path: Path, fd: int, busy_message: str) -> int:
    """Take over `fd`, a descriptor of `path` inherited from the process that locked it.

    The flock belongs to the open file description, which a child process shares with its
    parent: taking it again on the same description succeeds at once.

    Raises:
        ValueError: `fd` is not open, or is not a descriptor of `path`.
        FolderBusyError: `fd` does not hold the lock and another descriptor does (`busy_message`).
    """
    if isinstance(fd, bool) or not isinstance(fd, int):
        raise ValueError(f"lock descriptor {fd!r} of {str(path)!r}; accepted: an integer file descriptor")
    try:
        held, here = os.fstat(fd), os.stat(path)
    except OSError as e:
        raise ValueError(f"lock descriptor {fd!r} of {str(path)!r} cannot be checked ({e.strerror}); accepted: an "
                         "open descriptor of that file, inherited from the process that locked it") from None
    if (held.st_dev, held.st_ino) != (here.st_dev, here.st_ino):
        raise ValueError(f"lock descriptor {fd} is not a descriptor of {str(path)!r}; accepted: one of that file, "
                         "inherited from the process that locked it")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise FolderBusyError(busy_message) from None
    return fd


def lock_path(folder: str | Path) -> Path:
    """The lock file of `folder_lock(folder)`: `.<name>.lock` beside it (symlinks resolved)."""
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def folder_lock(folder: str | Path, wait: bool = False, what: str = "folder"):
    """Hold the exclusive lock of `folder` (its file beside it) while the block runs; the parent must exist.

    Another process, or another thread of this one, is refused (or waits, with `wait=True`); the
    thread that holds it may take it again (an export inside a caller that locked the same folder).

    Args:
        folder: the folder to write. wait: block until the lock is free instead of refusing.
        what: how errors name the folder ("output folder", "artifact cache folder").
    Raises:
        FolderBusyError: `wait` is False and another writer holds the lock, naming the folder
            and the lock file.
        PermissionError: the lock file cannot be created (naming it).
    """
    path = lock_path(folder)
    key = (str(path), threading.get_ident())
    with _held_guard:
        reentered = key in _held
        if reentered:
            _held[key] += 1
    if reentered:
        try:
            yield path
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    busy = (f"{what} {str(folder)!r} is being written by another process or thread (it holds {str(path)!r}); "
            "wait until it has finished, or choose another folder")
    try:
        fd = _acquire(path, wait, busy)
    except PermissionError as e:
        raise PermissionError(f"cannot lock {what} {str(folder)!r}: cannot create {str(path)!r} ({e.strerror})") from e
    try:
        with _held_guard:
            _held[key] = 1
        try:
            yield path
        finally:
            with _held_guard:
                del _held[key]
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


class FolderLock:
    """Hold `folder/.lock` exclusively until `release` (or the end of a `with` block); not re-entrant.

    Args:
        folder: the folder; created, with its parents, if missing.
        what: what the folder is, for messages (e.g. "checkpoint folder").
        fd: a descriptor of `folder/.lock` that already holds the lock, inherited from the process
            that took it (`edgecl run`'s training process writes the checkpoints its host process
            locked): adopted instead of locking the file anew. Closing it releases the lock only
            once every process sharing it has closed it.

    Raises:
        ValueError: `folder` is a file, cannot be created or is not writable (names it and why);
            `fd` is not a descriptor of the lock file.
        FolderBusyError: another process holds the lock (names the folder).
    """

    def __init__(self, folder: str | Path, what: str = "folder", fd: int | None = None):
        self.folder, self.what = Path(folder), what
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"{what} {str(self.folder)!r} is a file; accepted: a folder, or a path where one "
                             "can be created")
        lock = self.folder / LOCK_NAME
        busy = (f"{what} {str(self.folder)!r} is in use: another process writes into it (it holds the lock on "
                f"{LOCK_NAME}; `fuser {lock}` names it); accepted: one writer per folder: wait for it to end, "
                "or use another folder")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = _acquire(lock, False, busy) if fd is None else _adopt(lock, fd, busy)
        except FolderBusyError:
            raise
        except OSError as e:
            raise ValueError(f"{what} {str(self.folder)!r} cannot be created or written ({e.strerror}); accepted: "
                             "a folder you can write, or a path where one can be created") from e

    @property
    def held(self) -> bool:
        return self._fd is not None

    def fileno(self) -> int:
        """The descriptor that holds the lock (what a child process inherits to adopt it).

        Raises:
            ValueError: the lock was released.
        """
        if self._fd is None:
            raise ValueError(f"the lock of {self.what} {str(self.folder)!r} was released; accepted: a held lock")
        return self._fd

    def release(self) -> None:
        """Release the lock (closing the file descriptor releases it); again is a no-op."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
