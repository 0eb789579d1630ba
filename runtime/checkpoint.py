"""Crash-safe checkpoints of a long run: numbered folders of `.npz` parts, a `meta.json`, a `LATEST` pointer.

Layout under `root`:

    root/ckpt-000000007/engine.npz      one npz per part
    root/ckpt-000000007/buffer.npz
    root/ckpt-000000007/meta.json       {"format_version", "meta", "files": {name: {"sha256", "bytes"}}}
    root/LATEST                         "ckpt-000000007"

A checkpoint is written into a `.tmp-` folder, every file and the folder are fsynced, the
folder is renamed into place, then `LATEST` is replaced atomically. A process killed at
any moment (SIGKILL, power loss after the fsyncs) leaves either the previous `LATEST` or
the new one, each naming a complete folder; half-written folders only ever carry the
`.tmp-` prefix and are removed by the next save. One writer per `root`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

from .errors import ArtifactError
from .files import TMP_PREFIX, fsync_dir, write_atomic
from .manifest import sha256_file

FORMAT_VERSION = 1
LATEST_NAME = "LATEST"
META_NAME = "meta.json"
CKPT_PREFIX = "ckpt-"
_CKPT_RE = re.compile(r"ckpt-(\d{9})")
_PART_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


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


def save_checkpoint(root: str | Path, parts: dict[str, dict[str, np.ndarray]], meta: dict, keep: int = 2) -> Path:
    """Write a new checkpoint under `root`, point `LATEST` at it, keep the newest `keep`.

    Args:
        root: folder holding the checkpoints; created if missing.
        parts: part name (e.g. "engine", "buffer", "loop") -> array name -> array. Names
            match `[A-Za-z0-9_][A-Za-z0-9_.-]*`; object arrays are refused.
        meta: JSON-serialisable dict stored in `meta.json` (e.g. {"step": 123}).
        keep: how many complete checkpoints to keep, >= 1. Older ones and stale `.tmp-`
            entries from a crashed save are deleted after the new one is durable; the
            one `LATEST` names is never deleted.

    Returns:
        The new checkpoint folder.

    Raises:
        ValueError: `keep` < 1, a bad part or array name, an object array, or `meta`
            that is not a JSON-serialisable dict.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep={keep!r} is not accepted; expected an int >= 1")
    arrays = _checked_parts(parts)
    if not isinstance(meta, dict):
        raise ValueError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta is not JSON-serialisable ({e}); use str, int, float, bool, None, list, dict") from e

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
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
        record = {"format_version": FORMAT_VERSION, "meta": meta, "files": files}
        _write_synced(tmp / META_NAME, json.dumps(record, indent=1).encode())
        fsync_dir(tmp)
        os.rename(tmp, root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)
    _replace_latest(root, name)
    _prune(root, keep)
    return root / name


def load_checkpoint(root: str | Path, fallback: bool = False) -> Checkpoint | None:
    """Load and verify the checkpoint `LATEST` names.

    Every part file is checked against the size and sha256 in `meta.json` and read in
    full before anything is returned. If `LATEST` is missing (a kill during the first
    save) or garbled (with a warning), the newest checkpoint folder is used instead.

    Args:
        root: folder given to `save_checkpoint`.
        fallback: if the chosen checkpoint fails verification, warn and load the newest
            older one that verifies, instead of raising.

    Returns:
        The checkpoint, or None if `root` holds no checkpoint at all (no `LATEST`, no
        `ckpt-*` folder; leftovers of a crashed first save do not count).

    Raises:
        ArtifactError: the chosen checkpoint is corrupt (names the file and the fault),
            or with `fallback=True` no checkpoint verifies.
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
    try:
        return _load_verified(_folder(root, first))
    except ArtifactError as e:
        if not fallback:
            raise
        failures = [str(e)]
    for number in reversed([n for n in numbers if n < first]):
        warnings.warn(f"{failures[-1]}; falling back to {_folder(root, number)}", RuntimeWarning, stacklevel=2)
        try:
            return _load_verified(_folder(root, number))
        except ArtifactError as e:
            failures.append(str(e))
    raise ArtifactError(f"no checkpoint under {root} verifies: " + "; ".join(failures))


def rng_state_array(gen: np.random.Generator) -> np.ndarray:
    """The exact state of `gen`'s bit generator as JSON bytes in a uint8 array, to store in an npz.

    The stream of numbers continues exactly after `rng_from_state_array`; the SeedSequence
    (used only by `spawn`) is not part of the state.
    """
    text = json.dumps(gen.bit_generator.state, default=_json_array)
    return np.frombuffer(text.encode(), dtype=np.uint8).copy()


def rng_from_state_array(arr: np.ndarray) -> np.random.Generator:
    """The Generator whose bit-generator state `rng_state_array` stored in `arr`.

    Raises:
        ValueError: `arr` is not uint8 JSON of a state, or names an unknown bit generator.
    """
    arr = np.asarray(arr)
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ValueError(f"expected a 1-d uint8 array from rng_state_array, got {arr.dtype} of shape {arr.shape}")
    try:
        state = json.loads(arr.tobytes().decode(), object_hook=_json_unarray)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"rng state array is not JSON: {e}") from e
    kind = state.get("bit_generator") if isinstance(state, dict) else None
    if kind not in _BIT_GENERATORS:
        raise ValueError(f"rng state names bit generator {kind!r}; accepted: {', '.join(_BIT_GENERATORS)}")
    bit_generator = getattr(np.random, kind)()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


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
    meta_path = folder / META_NAME
    if not folder.is_dir():
        raise ArtifactError(f"checkpoint folder {folder} is missing")
    try:
        record = json.loads(meta_path.read_bytes())
    except FileNotFoundError:
        raise ArtifactError(f"{meta_path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{meta_path} is unreadable: {e}") from e
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or not isinstance(record.get("meta"), dict):
        raise ArtifactError(f"{meta_path} lacks a 'meta' dict or a 'files' dict")
    if record.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{meta_path} has format_version {record.get('format_version')!r}; "
                            f"accepted: {FORMAT_VERSION}")
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
    """Delete checkpoints beyond the newest `keep` (never LATEST's) and stale `.tmp-` entries."""
    for path in root.iterdir():
        if path.name.startswith(TMP_PREFIX):
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


def _json_array(value):
    # MT19937 keeps its key as an array; numpy scalars may appear in other states.
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in an rng state")


def _json_unarray(obj: dict):
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    return obj
