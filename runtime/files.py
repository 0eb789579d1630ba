"""Files a run writes where a crash must not leave half of one: `write_atomic`, `prepare_output`.

`write_atomic` writes a whole file or nothing (a temporary file beside it, fsync, rename
over, fsync the folder): a reader, or a resumable matrix that counts a cell's JSON as
"done", never sees it half written, even after a SIGKILL or a power cut. Checkpoints use
it for their `LATEST` pointer; `edgecl run --json`, `bench drift --json`, the board's run
results and `edgecl device train --json` for theirs.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

TMP_PREFIX = ".tmp-"  # temporary files beside their target; never match a "*.json" glob


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in `path` durable (POSIX); a file system that cannot is left as it is."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some FUSE and network mounts refuse fsync on a folder: the entry is there anyway
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Replace `path` with `data` (str: UTF-8) whole or not at all; returns the path written.

    The file gets the mode a plain `open(path, "w")` would give it (an existing file's mode,
    else 0666 minus the umask); a symlink is written through to its target.

    Raises:
        FileNotFoundError: the folder does not exist. PermissionError: the file or folder is
        not writable. Both name `path`.
    """
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: its folder {str(path.parent)!r} does not exist")
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"cannot write {str(path)!r}: the file is not writable")
    fd, tmp = _create_beside(path)
    try:
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def _create_beside(path: Path) -> tuple[int, Path]:
    # Not tempfile.mkstemp: its files are 0600 whatever the umask. O_EXCL with mode 0666 lets the
    # kernel apply the umask, as open() does, without reading it (os.umask would set it, process-wide).
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f"{TMP_PREFIX}{path.name}-{secrets.token_hex(4)}"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
        except PermissionError as e:
            raise PermissionError(f"cannot write {str(path)!r}: its folder is not writable") from e
    raise FileExistsError(f"cannot write {str(path)!r}: no free temporary name beside it")


def prepare_output(path: str | Path, suffixes=None) -> Path:
    """Check an output file before any long work: its suffix (if `suffixes` are given), its folder
    (created if missing) and that both can be written.

    Raises:
        ValueError: naming the path and what is wrong with it.
    """
    path = Path(path)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ValueError(f"output {str(path)!r}: suffix {path.suffix or '(none)'!r}; accepted: {', '.join(suffixes)}")
    if path.is_dir():
        raise ValueError(f"output {str(path)!r} is a folder; accepted: a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"output {str(path)!r}: cannot create its folder ({e.strerror})") from e
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"output {str(path)!r} is not writable; accepted: a path in a folder you can write")
    return path


def check_output_dir(path: str | Path, name: str = "out") -> Path:
    """Check an output folder before any long work, creating nothing: not a file, and either a
    writable folder or one that can be created (its nearest existing ancestor is a writable folder).

    Args:
        path: the folder. name: the argument it came from, for the message (e.g. "out").
    Raises:
        ValueError: naming the argument, the path and what is wrong with it.
    """
    path = Path(path)
    said = f"{name}={str(path)!r}"
    if path.exists() and not path.is_dir():
        raise ValueError(f"{said} is a file; accepted: a folder (a missing one is created)")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{said} cannot be created: {str(ancestor)!r} is a file; accepted: a folder path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{said} is not writable ({str(ancestor)!r}); accepted: a folder you can write")
    return path
