"""One writer per folder: `FolderLock`, an exclusive non-blocking `flock` on a lock file inside the folder.

The lock goes with the process's file descriptors: a process killed while it holds the lock
leaves nothing stale to clear. The lock file stays after `release` (deleting it would let two
writers lock two different files); opening an existing one writes nothing into the folder.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import FolderBusyError

LOCK_NAME = ".lock"


class FolderLock:
    """Hold `folder/.lock` exclusively until `release` (or the end of a `with` block).

    Args:
        folder: the folder; created, with its parents, if missing.
        what: what the folder is, for messages (e.g. "checkpoint folder").

    Raises:
        ValueError: `folder` is a file, cannot be created or is not writable (names it and why).
        FolderBusyError: another process holds the lock (names the folder).
    """

    def __init__(self, folder: str | Path, what: str = "folder"):
        self.folder, self.what = Path(folder), what
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"{what} {str(self.folder)!r} is a file; accepted: a folder, or a path where one "
                             "can be created")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ValueError(f"{what} {str(self.folder)!r} cannot be created or written ({e.strerror}); accepted: "
                             "a folder you can write, or a path where one can be created") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusyError(f"{what} {str(self.folder)!r} is in use: another process writes into it (it "
                                   f"holds the lock on {LOCK_NAME}; `fuser {self.folder / LOCK_NAME}` names it); "
                                   "accepted: one writer per folder: wait for it to end, or use another folder"
                                   ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Release the lock (closing the file descriptor releases it); again is a no-op."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
