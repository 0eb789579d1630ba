"""Where `export` writes: a fresh folder beside the output folder, moved into place whole.

An export never deletes what it did not write. It writes into a new temporary folder in the
output folder's parent (created with the mode a plain `mkdir` gives, not mkdtemp's 0700) and
renames it into place once every file is written and the manifest reads back. The output
folder may be missing, empty, or an earlier export (`manifest.json` and only files an export
writes); anything else is refused before any work, naming what is in it. The working folder,
or one holding it, is refused too: replacing it would pull the folder out from under the shell.
"""

from __future__ import annotations

import os
import secrets
import shutil
import warnings
from pathlib import Path

from edgecl.runtime.files import TMP_PREFIX, fsync_dir
from edgecl.runtime.manifest import DIGEST_NAME, MANIFEST_NAME
from edgecl.runtime.manifest_schema import COMMON_FILES, ENGINE_FILES

from .latent import PREFIX_FILE
from .ort_training import GRAPH_FILES, OPTIMIZER_FILES

# Every name an export writes, whatever the engine: the only names an earlier export may hold.
EXPORT_NAMES = frozenset({MANIFEST_NAME, DIGEST_NAME, *COMMON_FILES, *(n for names in ENGINE_FILES.values()
                                                                        for n in names),
                          *GRAPH_FILES, *OPTIMIZER_FILES.values(), PREFIX_FILE})


def _foreign_entries(folder: Path) -> list[str]:
    """Entries of `folder` that are not files an export writes (all of them if it holds no manifest)."""
    entries = sorted(folder.iterdir())
    if not any(e.name == MANIFEST_NAME for e in entries):
        return [e.name for e in entries]
    return [e.name for e in entries if e.name not in EXPORT_NAMES or e.is_symlink() or not e.is_file()]


def check_out_dir(out_dir, overwrite: bool = True) -> Path:
    """The folder an export into `out_dir` will replace (symlinks resolved), checked before any work.

    Nothing is written here.

    Raises:
        ValueError: `out_dir` is a file, the working folder or one holding it, a non-empty folder
            that is not an earlier export (naming what it holds), or its nearest existing parent is
            not writable.
        FileExistsError: `out_dir` exists and `overwrite` is False.
    """
    shown = str(out_dir)
    target = Path(out_dir).resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise ValueError(f"output folder {shown!r} is the working folder or holds it: an export replaces its folder "
                         f"whole; accepted: a folder that does not hold the working folder, e.g. "
                         f"{str(Path(out_dir) / 'artifacts')!r}")
    if target.exists() and not target.is_dir():
        raise ValueError(f"output folder {shown!r} is a file; accepted: a new folder, an empty one or an earlier "
                         "export")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{shown!r} exists; pass overwrite=True to replace it")
        foreign = _foreign_entries(target)
        if foreign:
            more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            listed = ", ".join(repr(n) for n in foreign[:5]) + more
            raise ValueError(f"output folder {shown!r} holds {listed}, which no export wrote: an export replaces its "
                             f"folder whole and deletes nothing it did not write; accepted: a new or empty folder, or "
                             f"an earlier export (manifest.json and the files an export writes)")
    parent = next(p for p in target.parents if p.exists())  # the temporary folder is made there, then renamed
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {shown!r}: {str(parent)!r} is not writable (an export is written beside its "
                         f"folder, then moved into place); accepted: a folder whose parent you can write")
    return target


def make_temp_folder(target: Path) -> Path:
    """A new, empty folder beside `target`, with `target`'s mode if it exists, else what `mkdir` gives."""
    for _ in range(100):
        tmp = target.parent / f"{TMP_PREFIX}{target.name}-{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp, 0o777)  # the kernel applies the umask, as for any mkdir
        except FileExistsError:
            continue
        if target.is_dir():
            os.chmod(tmp, target.stat().st_mode & 0o7777)
        return tmp
    raise FileExistsError(f"no free temporary name beside {str(target)!r}")


def move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished folder `tmp` to `target`; an earlier export there is moved aside, then its files deleted.

    Between the two renames `target` is briefly missing, never a mix of two exports.

    Raises:
        ValueError: `target` changed since `check_out_dir` and now holds what no export wrote.
    """
    check_out_dir(target)  # again, just before the move: a user may have put a file there meanwhile
    old = None
    if target.is_dir() and any(target.iterdir()):
        old = target.parent / f"{TMP_PREFIX}{target.name}-old-{secrets.token_hex(4)}"
        os.rename(target, old)
    os.rename(tmp, target)  # onto a missing or empty folder (POSIX rename replaces an empty one)
    fsync_dir(target.parent)
    if old is not None:
        for entry in old.iterdir():
            if entry.name in EXPORT_NAMES and entry.is_file() and not entry.is_symlink():
                entry.unlink()
        try:
            old.rmdir()
        except OSError:
            warnings.warn(f"the earlier export of {str(target)!r} was replaced; {str(old)!r} kept what else appeared "
                          "in it meanwhile", stacklevel=3)


def discard(tmp: Path) -> None:
    """Delete an unfinished temporary folder (everything in it was written by this export)."""
    shutil.rmtree(tmp, ignore_errors=True)
