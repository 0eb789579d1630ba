"""Moving folders of files over a link in chunks, checked file by file with sha256.

The sender announces every file (name, size, sha256), then sends CHUNK frames in order,
each `encode_chunk(file_index, offset, bytes)`. The receiver writes them into a hidden
temporary folder and `Incoming.commit` moves it into place only once every file has its full
size and its sha256 checks: a half-received or damaged folder is never where a reader looks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

from .link import LinkError, ProtocolError

CHUNK_HEADER = struct.Struct("<HQ")  # file index, byte offset
DEFAULT_CHUNK_BYTES = 4096
INCOMING_DIR = ".incoming"
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


class TransferError(LinkError):
    """A transfer was refused or did not check: wrong size or sha256, bad name, chunk out of order."""


@dataclasses.dataclass(frozen=True)
class FileSpec:
    """One file of a transfer: a plain name (no folders), its size in bytes and sha256 (hex)."""

    name: str
    bytes: int
    sha256: str

    def __post_init__(self):
        check_name(self.name, "file name")
        if isinstance(self.bytes, bool) or not isinstance(self.bytes, int) or self.bytes < 0:
            raise TransferError(f"file {self.name!r}: bytes={self.bytes!r}; accepted: an integer >= 0")
        if not re.fullmatch(r"[0-9a-f]{64}", str(self.sha256)):
            raise TransferError(f"file {self.name!r}: sha256={self.sha256!r}; accepted: 64 lowercase hex digits")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_name(name: str, what: str = "name") -> str:
    """A file or folder name safe to join to a folder: letters, digits, '_', '.', '-', no leading '.'.

    Raises:
        TransferError: anything else (a path, '..', an empty or hidden name).
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise TransferError(f"{what} {name!r} is not accepted; use 1-128 letters, digits, '_', '.', '-', "
                            "not starting with '.'")
    return name


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_specs(folder: str | Path) -> list[FileSpec]:
    """Specs of every regular file directly inside `folder`, sorted by name.

    Raises:
        TransferError: the folder is missing or empty, or holds a sub-folder or a bad name.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise TransferError(f"{str(folder)!r} is not a folder")
    specs = []
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            raise TransferError(f"{str(path)!r} is not a plain file; accepted: a flat folder of files")
        specs.append(FileSpec(check_name(path.name, "file name"), path.stat().st_size, sha256_path(path)))
    if not specs:
        raise TransferError(f"{str(folder)!r} is empty")
    return specs


def chunk_spans(size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(offset, length) of each chunk of a `size`-byte file; an empty file has none.

    Raises:
        ValueError: size < 0 or chunk_bytes < 1.
    """
    if size < 0 or chunk_bytes < 1:
        raise ValueError(f"size={size}, chunk_bytes={chunk_bytes}; accepted: size >= 0, chunk_bytes >= 1")
    return [(offset, min(chunk_bytes, size - offset)) for offset in range(0, size, chunk_bytes)]


def encode_chunk(file_index: int, offset: int, data: bytes) -> bytes:
    """CHUNK payload: u16 file index, u64 byte offset (little-endian), then the bytes."""
    if not 0 <= file_index < 1 << 16 or not 0 <= offset < 1 << 64:
        raise ValueError(f"file_index={file_index}, offset={offset}; accepted: 0 <= index < 65536, offset >= 0")
    return CHUNK_HEADER.pack(file_index, offset) + bytes(data)


def decode_chunk(payload: bytes) -> tuple[int, int, bytes]:
    """(file index, offset, bytes) of a CHUNK payload. Raises ProtocolError if it is too short."""
    if len(payload) < CHUNK_HEADER.size:
        raise ProtocolError(f"CHUNK payload of {len(payload)} bytes; accepted: at least {CHUNK_HEADER.size}")
    index, offset = CHUNK_HEADER.unpack_from(payload)
    return index, offset, payload[CHUNK_HEADER.size:]


class Incoming:
    """A folder being received under `root/.incoming/`, moved to `dest` by `commit` once it checks.

    Args:
        root: the folder holding `.incoming/` (same file system as `dest`, so the move is a rename).
        specs: the files announced by the sender.
    """

    def __init__(self, root: str | Path, specs: list[FileSpec]):
        names = [s.name for s in specs]
        if len(set(names)) != len(names) or not specs:
            raise TransferError(f"files {names}; accepted: one or more distinct names")
        self.specs = list(specs)
        base = Path(root) / INCOMING_DIR
        base.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=base))
        self.received = [0] * len(specs)
        self._hashes = [hashlib.sha256() for _ in specs]

    @property
    def complete(self) -> bool:
        return all(r == s.bytes for r, s in zip(self.received, self.specs))

    def write(self, payload: bytes) -> None:
        """Append one CHUNK. Raises TransferError for an unknown file or an offset out of order."""
        index, offset, data = decode_chunk(payload)
        if index >= len(self.specs):
            raise TransferError(f"chunk for file #{index}; the transfer has {len(self.specs)} files")
        spec = self.specs[index]
        if offset != self.received[index] or offset + len(data) > spec.bytes:
            raise TransferError(f"chunk of {spec.name!r} at offset {offset} (+{len(data)} B); expected offset "
                                f"{self.received[index]} within {spec.bytes} B")
        with open(self.tmp / spec.name, "ab") as f:
            f.write(data)
        self.received[index] += len(data)
        self._hashes[index].update(data)

    def commit(self, dest: str | Path, check=None) -> Path:
        """Check every file's size and sha256, then move the folder to `dest` (replacing it).

        Args:
            dest: where the folder goes. check: optional callable(folder) run on the checked
                temporary folder before the move (e.g. the artifact manifest's own sha256s);
                whatever it raises aborts the commit.
        Raises:
            TransferError: a file is short or its sha256 differs; nothing is moved, the
                temporary folder is deleted.
        """
        try:
            for spec, got, h in zip(self.specs, self.received, self._hashes):
                if got != spec.bytes:
                    raise TransferError(f"{spec.name!r}: received {got} of {spec.bytes} bytes")
                path = self.tmp / spec.name
                if not path.exists():  # empty files get no chunk
                    path.touch()
                if h.hexdigest() != spec.sha256 or sha256_path(path) != spec.sha256:
                    raise TransferError(f"{spec.name!r}: sha256 {sha256_path(path)[:16]}... differs from the "
                                        f"announced {spec.sha256[:16]}...; nothing kept")
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
            if check is not None:
                check(self.tmp)
        except BaseException:
            self.discard()
            raise
        return replace_folder(self.tmp, Path(dest))

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def replace_folder(src: Path, dest: Path) -> Path:
    """Rename `src` to `dest`; an existing `dest` is first renamed aside, then deleted.

    A kill in between leaves `dest` missing (and the old copy under `.incoming`), never mixed.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(dir=src.parent, prefix="old-"))
        os.rename(dest, old / dest.name)
    os.rename(src, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def clear_incoming(root: str | Path) -> int:
    """Delete leftovers of transfers cut short (a killed agent). Returns how many were removed."""
    base = Path(root) / INCOMING_DIR
    if not base.is_dir():
        return 0
    leftovers = list(base.iterdir())
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return len(leftovers)
