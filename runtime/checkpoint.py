"""Crash-safe checkpoints: numbered folders of `.npz` parts, a `meta.json` and its digest, a `LATEST` pointer.

Layout under `root`:

    root/ckpt-000000007/engine.npz      one npz per part
    root/ckpt-000000007/buffer.npz
    root/ckpt-000000007/meta.json       {"format_version", "meta", "files": {name: {"sha256", "bytes"}}}
    root/ckpt-000000007/meta.sha256     "<sha256 of meta.json>  meta.json" (what `sha256sum -c` reads)
    root/LATEST                         "ckpt-000000007"
    root/.lock                          locked (flock) by the one process writing into root

A checkpoint is written into a `.tmp-` folder, every file and the folder are fsynced, the
folder is renamed into place, then `LATEST` is replaced atomically. A process killed at
any moment (SIGKILL, power loss after the fsyncs) leaves either the previous `LATEST` or
the new one, each naming a complete folder; half-written folders only ever carry the
`.tmp-` prefix and are removed by the next save. Every byte is checked on load: the digest
of `meta.json` before it is parsed (the digest sits beside it, inside the folder, so every
checkpoint, the older ones fallen back to and a copy fetched from a board, carries its own),
then the size and sha256 of each part that `meta.json` lists.

One writer per `root`: `CheckpointWriter` holds an exclusive lock on `root/.lock` while it
is open (`save_checkpoint` opens one for its one save) and refuses to open while another
process holds it. Pruning deletes only what this module writes (`ckpt-*` beyond `keep`, its
own `.tmp-ckpt-*` / `.tmp-del-ckpt-*` folders and the temporary `LATEST` of `write_atomic`),
never another file of the folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

from .errors import ArtifactError, CheckpointFormatError
from .files import TMP_PREFIX, fsync_dir, write_atomic
from .locks import FolderLock
from .manifest import sha256_file
from .rng_state import rng_from_state_array, rng_state_array  # noqa: F401  (public here: a Generator in a part)

FORMAT_VERSION = 2  # 1 had no meta.sha256: refused on load (_refuse_old_format)
LATEST_NAME = "LATEST"
META_NAME = "meta.json"
META_DIGEST_NAME = "meta.sha256"
CKPT_PREFIX = "ckpt-"
_CKPT_RE = re.compile(r"ckpt-(\d{9})")
_PART_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_DIGEST_RE = re.compile(rb"([0-9a-f]{64})  meta\.json\n?")
# What a killed save or prune of this module leaves, and nothing else: a save's folder (the suffix
# is tempfile.mkdtemp's), a pruned folder being deleted, write_atomic's LATEST (files._create_beside).
_OWN_TMP_RE = re.compile(re.escape(TMP_PREFIX) + rf"(?:{CKPT_PREFIX}\d{{9}}-[a-z0-9_]+|del-{CKPT_PREFIX}\d{{9}}"
                         rf"|{LATEST_NAME}-[0-9a-f]{{8}})")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One verified checkpoint.

    Attributes:
        path: the checkpoint folder, e.g. root/ckpt-000000007.
        meta: the `meta` dict given to `save_checkpoint`.
        parts: part name -> array name -> array, as saved (dtype and shape exact).
    """

    path: Path
    meta: dict
    parts: dict


def check_checkpoint_root(root: str | Path) -> None:
    """Raise ValueError if `root` exists and is not a folder (a path that does not exist yet passes)."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"checkpoint folder {str(root)!r} is a file; accepted: a folder, or a path where one "
                         "can be created")


class CheckpointWriter:
    """The one writer of a checkpoint folder: holds its `FolderLock` (`root/.lock`) until `close`.

    A context manager; `save` writes checkpoints.

    Args:
        root: the checkpoint folder; created, with its parents, if missing.
        lock_fd: a descriptor of `root/.lock` holding its lock, inherited from the process that
            took it (`lock_fileno` there), to write into a folder that process holds.

    Raises:
        ValueError: `root` is a file, cannot be created or is not writable (names it and why);
            `lock_fd` is not a descriptor of `root/.lock`.
        FolderBusyError: another process writes checkpoints into `root` (names it).
    """

    def __init__(self, root: str | Path, lock_fd: int | None = None):
        self.root = Path(root)
        self._lock = FolderLock(self.root, "checkpoint folder", lock_fd)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the folder's lock."""
        self._lock.release()

    def lock_fileno(self) -> int:
        """The descriptor holding the folder's lock, for a child process to adopt (`lock_fd`).

        Raises:
            ValueError: the writer is closed.
        """
        return self._lock.fileno()

    def save(self, parts: dict[str, dict[str, np.ndarray]], meta: dict, keep: int = 2) -> Path:
        """Write a new checkpoint under the folder, point `LATEST` at it, keep the newest `keep`.

        Args:
            parts: part name (e.g. "engine", "buffer", "loop") -> array name -> array. Names
                match `[A-Za-z0-9_][A-Za-z0-9_.-]*`; object arrays are refused.
            meta: JSON-serialisable dict stored in `meta.json` (e.g. {"step": 123}).
            keep: how many complete checkpoints to keep, >= 1. Older ones and what a crashed
                save of this module left are deleted after the new one is durable; the one
                `LATEST` names is never deleted.

        Returns:
            The new checkpoint folder.

        Raises:
            ValueError: `keep` < 1, a bad part or array name, an object array, `meta` that is
                not a JSON-serialisable dict, or a closed writer.
        """
        if not self._lock.held:
            raise ValueError(f"the CheckpointWriter of {str(self.root)!r} is closed; accepted: an open one")
        arrays = _checked_save_args(parts, meta, keep)
        root = self.root
        name = f"{CKPT_PREFIX}{_next_number(root):09d}"
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"{TMP_PREFIX}{name}-"))
        try:
            files = {}
            for part, part_arrays in arrays.items():
                file_name = f"{part}.npz"
                with open(tmp / file_name, "wb") as f:
                    _write_npz(f, part_arrays)
                    f.flush()
                    os.fsync(f.fileno())
                files[file_name] = {"sha256": sha256_file(tmp / file_name), "bytes": (tmp / file_name).stat().st_size}
            record = json.dumps({"format_version": FORMAT_VERSION, "meta": meta, "files": files}, indent=1).encode()
            _write_synced(tmp / META_NAME, record)
            _write_synced(tmp / META_DIGEST_NAME, f"{hashlib.sha256(record).hexdigest()}  {META_NAME}\n".encode())
            fsync_dir(tmp)
            os.rename(tmp, root / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(root)
        _replace_latest(root, name)
        _prune(root, keep)
        return root / name


def save_checkpoint(root: str | Path, parts: dict[str, dict[str, np.ndarray]], meta: dict, keep: int = 2) -> Path:
    """Write one checkpoint under `root` (created if missing), as its one writer for this save.

    `CheckpointWriter(root).save(parts, meta, keep)`; a long run holds one writer instead,
    so no other process writes between its saves.

    Raises:
        ValueError: bad arguments (see `CheckpointWriter.save`), refused before `root` is
            created or locked; `root` is a file.
        FolderBusyError: another process writes checkpoints into `root`.
    """
    _checked_save_args(parts, meta, keep)
    with CheckpointWriter(root) as writer:
        return writer.save(parts, meta, keep)


def load_checkpoint(root: str | Path, fallback: bool = False, check=None) -> Checkpoint | None:
    """Load and verify the checkpoint `LATEST` names.

    `meta.json` is checked against its digest (`meta.sha256`) before it is parsed, and every
    part file against the size and sha256 in `meta.json` and read in full, before anything
    is returned. If `LATEST` is missing (a kill during the first save) or garbled (with a
    warning), the newest checkpoint folder is used instead. Reading takes no lock.

    Args:
        root: folder given to `save_checkpoint`.
        fallback: if the chosen checkpoint fails verification (or `check`), warn and load the
            newest older one that passes, instead of raising.
        check: optional callable(Checkpoint) run on each verified checkpoint before it is
            returned (e.g. the loop's schema of its `meta`); an ArtifactError it raises counts
            as a failed verification, anything else propagates.

    Returns:
        The checkpoint, or None if `root` holds no checkpoint at all (no `LATEST`, no
        `ckpt-*` folder; leftovers of a crashed first save do not count).

    Raises:
        ArtifactError: the chosen checkpoint is corrupt (names the file and the fault),
            or with `fallback=True` no checkpoint verifies.
        CheckpointFormatError: a checkpoint of another format version (never fallen back
            from: the older ones of that run are of that version too).
    """
    root = Path(root)
    numbers = _checkpoint_numbers(root)
    latest_path = root / LATEST_NAME
    if not latest_path.exists() and not numbers:
        return None
    first = _read_latest(root)
    if first is None:
        if not numbers:
            raise ArtifactError(f"{latest_path} is garbled and {root} holds no {CKPT_PREFIX}* folder")
        first = numbers[-1]
        # A kill between the first folder rename and the first LATEST leaves no LATEST: that is
        # expected. A garbled one is not, but the folder is verified all the same.
        if latest_path.exists():
            warnings.warn(f"{latest_path} is garbled; using the newest checkpoint {_folder(root, first)}",
                          RuntimeWarning, stacklevel=2)
    candidates = [first] + ([n for n in reversed(numbers) if n < first] if fallback else [])
    failures = []
    for number in candidates:
        if failures:
            warnings.warn(f"{failures[-1]}; falling back to {_folder(root, number)}", RuntimeWarning, stacklevel=2)
        try:
            ckpt = _load_verified(_folder(root, number))
            if check is not None:
                check(ckpt)
            return ckpt
        except CheckpointFormatError:
            raise
        except ArtifactError as e:
            if not fallback:
                raise
            failures.append(str(e))
    raise ArtifactError(f"no checkpoint under {root} verifies: " + "; ".join(failures))


def _checked_save_args(parts: dict, meta: dict, keep: int) -> dict[str, dict[str, np.ndarray]]:
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep={keep!r} is not accepted; expected an int >= 1")
    arrays = _checked_parts(parts)
    if not isinstance(meta, dict):
        raise ValueError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta is not JSON-serialisable ({e}); use str, int, float, bool, None, list, dict") from e
    return arrays


def _checked_parts(parts: dict) -> dict[str, dict[str, np.ndarray]]:
    if not isinstance(parts, dict):
        raise ValueError(f"parts must be a dict of part name -> dict of arrays, got {type(parts).__name__}")
    out = {}
    for part, arrays in parts.items():
        if not isinstance(part, str) or not _PART_RE.fullmatch(part):
            raise ValueError(f"part name {part!r} is not accepted; use letters, digits, '_', '.', '-'")
        if not isinstance(arrays, dict):
            raise ValueError(f"part {part!r} must be a dict of array name -> array, got {type(arrays).__name__}")
        out[part] = {}
        for key, value in arrays.items():
            if not isinstance(key, str) or not key or "/" in key:
                raise ValueError(f"array name {key!r} in part {part!r} is not accepted; "
                                 "use a non-empty str without '/'")
            value = np.asarray(value)
            if value.dtype.hasobject:
                raise ValueError(f"array {part}/{key} has dtype {value.dtype}; object arrays cannot be stored")
            out[part][key] = value
    return out


def _write_npz(f, arrays: dict[str, np.ndarray]) -> None:
    # What np.savez does, minus its keyword parameters: an array named "file" or
    # "allow_pickle" would collide with them (the latter is silently swallowed).
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, value in arrays.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, value, allow_pickle=False)


def _load_verified(folder: Path) -> Checkpoint:
    if not folder.is_dir():
        raise ArtifactError(f"checkpoint folder {folder} is missing")
    record = _read_record(folder)
    files = record["files"]
    meta_path = folder / META_NAME
    parts = {}
    for file_name, entry in files.items():
        path = folder / file_name
        if not (isinstance(file_name, str) and file_name.endswith(".npz") and _PART_RE.fullmatch(file_name)
                and isinstance(entry, dict) and {"sha256", "bytes"} <= entry.keys()):
            raise ArtifactError(f"{meta_path} has a malformed entry {file_name!r}: {entry!r}")
        if not path.is_file():
            raise ArtifactError(f"{path} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(f"{path} is {size} bytes, expected {entry['bytes']} (truncated or altered)")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise ArtifactError(f"{path} has sha256 {digest}, expected {entry['sha256']} (altered)")
        try:
            with np.load(path, allow_pickle=False) as npz:
                parts[file_name[: -len(".npz")]] = {key: npz[key] for key in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ArtifactError(f"{path} is not a readable npz: {e}") from e
    return Checkpoint(path=folder, meta=record["meta"], parts=parts)


def _read_record(folder: Path) -> dict:
    """meta.json of `folder`, after its digest in meta.sha256 checked (format_version 2)."""
    meta_path, digest_path = folder / META_NAME, folder / META_DIGEST_NAME
    try:
        data = meta_path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{meta_path} is missing") from None
    except OSError as e:
        raise ArtifactError(f"{meta_path} is unreadable: {e}") from e
    try:
        line = digest_path.read_bytes()
    except FileNotFoundError:
        _refuse_old_format(meta_path, data)
        raise ArtifactError(f"{digest_path} is missing (it holds the sha256 of {META_NAME})") from None
    except OSError as e:
        raise ArtifactError(f"{digest_path} is unreadable: {e}") from e
    m = _DIGEST_RE.fullmatch(line)
    if m is None:
        raise ArtifactError(f"{digest_path} is garbled; accepted: '<64 hex digits>  {META_NAME}'")
    digest, expected = hashlib.sha256(data).hexdigest(), m.group(1).decode()
    if digest != expected:
        raise ArtifactError(f"{meta_path} has sha256 {digest}, expected {expected} (altered)")
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{meta_path} is unreadable: {e}") from e
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict) or not isinstance(
            record.get("meta"), dict):
        raise ArtifactError(f"{meta_path} lacks a 'meta' dict or a 'files' dict")
    if record.get("format_version") != FORMAT_VERSION:
        raise CheckpointFormatError(f"{meta_path} has format_version {record.get('format_version')!r}; "
                                    f"accepted: {FORMAT_VERSION} (written by another version of edgecl)")
    return record


def _refuse_old_format(meta_path: Path, data: bytes) -> None:
    """Raise CheckpointFormatError if meta.json without a digest is a whole format_version 1 record."""
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return  # a damaged folder, not an old one: the caller says the digest is missing
    if isinstance(record, dict) and record.get("format_version") == 1 and isinstance(record.get("files"), dict):
        raise CheckpointFormatError(
            f"{meta_path.parent} was written by an earlier edgecl (checkpoint format_version 1, which records "
            f"neither the run's settings nor a digest of {META_NAME}, so a resume could neither be checked "
            f"nor trusted); accepted: format_version {FORMAT_VERSION}: finish that run with the edgecl that "
            "started it, or start it again in a new or empty folder")


def _checkpoint_numbers(root: Path) -> list[int]:
    """Numbers of the `ckpt-NNNNNNNNN` folders under root, ascending."""
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _CKPT_RE.fullmatch(p.name)) and p.is_dir())


def _folder(root: Path, number: int) -> Path:
    return root / f"{CKPT_PREFIX}{number:09d}"


def _read_latest(root: Path) -> int | None:
    """The number LATEST names, or None if it is missing or garbled."""
    try:
        m = _CKPT_RE.fullmatch((root / LATEST_NAME).read_bytes().decode("ascii").strip())
    except (OSError, UnicodeDecodeError):
        return None
    return int(m.group(1)) if m else None


def _next_number(root: Path) -> int:
    numbers = _checkpoint_numbers(root) + [n for n in [_read_latest(root)] if n is not None]
    return max(numbers, default=0) + 1


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace_latest(root: Path, name: str) -> None:
    write_atomic(root / LATEST_NAME, f"{name}\n")


def _prune(root: Path, keep: int) -> None:
    """Delete checkpoints beyond the newest `keep` (never LATEST's) and what killed saves of this module left.

    Only under the folder's lock: another writer's `.tmp-` folder in the making would match too.
    """
    for path in root.iterdir():
        if _OWN_TMP_RE.fullmatch(path.name):
            _remove(path)
    numbers = _checkpoint_numbers(root)
    protected = set(numbers[-keep:]) | {_read_latest(root)}
    for number in numbers:
        if number not in protected:
            # Rename first so a kill mid-delete leaves a `.tmp-` leftover, never a half-deleted ckpt-*.
            doomed = root / f"{TMP_PREFIX}del-{CKPT_PREFIX}{number:09d}"
            os.rename(_folder(root, number), doomed)
            _remove(doomed)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
