"""Incremental persistence of a replay buffer: an append-only log of the slots written since the last save.

A full buffer is megabytes (8 MiB in the online learner's default budget) and one save changes a
few of its slots, so `OnlineLearner.save` does not rewrite it: it appends one fixed-size record
per changed slot to `buffer-<generation>.log` beside the checkpoints, fsyncs, and only then writes
the checkpoint that names how many records of which generation it covers. Replaying that many
records, in order, onto an empty buffer rebuilds the buffer exactly (a later record of a slot
overwrites an earlier one).

Crash safety: a kill before the checkpoint leaves records past the committed count; they are cut
off on the next open (`restore`). Each record carries a CRC-32 of its bytes, so a torn or altered
record is found (an `ArtifactError`, which makes `load_checkpoint` fall back to the older
checkpoint). When the log holds more than `COMPACT_FACTOR` times the stored examples, the save
writes a new generation holding each stored slot once instead. The two newest generations are
kept: the older of the two kept checkpoints may name the previous one.
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path

import numpy as np

from .buffer import LOGITS_DTYPE, TASK_DTYPE, X_DTYPE, Y_DTYPE, ReplayBuffer
from .errors import ArtifactError
from .files import fsync_dir

LOG_RE = re.compile(r"buffer-(\d{6})\.log")
COMPACT_FACTOR = 2  # a log past 2x the stored examples (and past one buffer's worth) is rewritten compact


def log_name(generation: int) -> str:
    return f"buffer-{generation:06d}.log"


def record_dtype(buffer: ReplayBuffer) -> np.dtype:
    """One packed little-endian record: slot, label, task, input, logits (if stored), CRC-32 of the rest."""
    fields = [("slot", "<u4"), ("y", Y_DTYPE.newbyteorder("<")), ("task", TASK_DTYPE.newbyteorder("<")),
              ("x", X_DTYPE.newbyteorder("<"), buffer.sample_shape)]
    if buffer.store_logits:
        fields.append(("logits", LOGITS_DTYPE.newbyteorder("<"), (buffer.num_classes,)))
    fields.append(("crc", "<u4"))
    return np.dtype(fields)


class BufferLog:
    """The log files of one buffer in `folder`, and the generation and record count last committed.

    Args:
        folder: the online learner's state folder (held by its CheckpointWriter's lock).
        buffer: the buffer whose slots are logged.
    """

    def __init__(self, folder: str | Path, buffer: ReplayBuffer):
        self.folder = Path(folder)
        self.buffer = buffer
        self.dtype = record_dtype(buffer)
        self.generation = 0
        self.records = 0  # committed: named by the newest checkpoint

    def state(self) -> dict:
        return {"generation": self.generation, "records": self.records, "record_bytes": self.dtype.itemsize}

    def verify(self, state: dict) -> np.ndarray:
        """The committed records `state` (a checkpoint's `log` entry) names, each CRC-checked.

        Raises:
            ArtifactError: a missing or short file, a record of another size, or a bad CRC (names which).
        """
        generation, records, size = state["generation"], state["records"], state["record_bytes"]
        path = self.folder / log_name(generation)
        if size != self.dtype.itemsize:
            raise ArtifactError(f"{path}: records of {size} B; this buffer's are {self.dtype.itemsize} B")
        if records == 0:
            return np.zeros(0, self.dtype)
        try:
            with open(path, "rb") as f:
                data = f.read(records * size)
        except OSError as e:
            raise ArtifactError(f"buffer log {str(path)!r} is unreadable: {e}") from e
        if len(data) < records * size:
            raise ArtifactError(f"buffer log {path} holds {len(data)} B; its checkpoint names {records} records "
                                f"of {size} B ({records * size} B)")
        table = np.frombuffer(data, self.dtype)
        body = size - 4
        for i in range(records):
            if zlib.crc32(data[i * size : i * size + body]) != int(table["crc"][i]):
                raise ArtifactError(f"buffer log {path}: record {i} of {records} fails its CRC-32 (a torn or altered "
                                    "file)")
        return table

    def restore(self, state: dict, table: np.ndarray) -> None:
        """Write the verified `table` of `state` into the buffer's arrays; cut uncommitted records and
        drop generations no kept checkpoint can name (newer ones, and those before the previous)."""
        b = self.buffer
        if len(table):
            if int(table["slot"].max()) >= b.capacity:
                raise ArtifactError(f"buffer log names slot {int(table['slot'].max())}; the buffer has {b.capacity}")
            slots = table["slot"].astype(np.int64)
            b.x[slots] = table["x"]  # fancy assignment in order: a later record of a slot wins
            b.y[slots] = table["y"]
            b.task[slots] = table["task"]
            if b.store_logits:
                b.logits[slots] = table["logits"]
        b.changed[:] = False
        self.generation, self.records = state["generation"], state["records"]
        path = self.folder / log_name(self.generation)
        if path.exists() and path.stat().st_size > self.records * self.dtype.itemsize:
            os.truncate(path, self.records * self.dtype.itemsize)
        self._drop(lambda g: g > self.generation or g < self.generation - 1)

    def append(self, slots: np.ndarray) -> dict:
        """Write `slots` after the committed records (or a compact new generation), fsynced; returns the
        `state` to commit with the checkpoint. Nothing is committed until `commit`."""
        stored = len(self.buffer)
        if self.records + len(slots) > COMPACT_FACTOR * max(stored, 1) and self.records + len(slots) > stored:
            generation, start, slots = self.generation + 1, 0, np.arange(stored, dtype=np.int64)
        else:
            generation, start = self.generation, self.records
        path = self.folder / log_name(generation)
        table = self._records(slots)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.lseek(fd, start * self.dtype.itemsize, os.SEEK_SET)
            os.write(fd, table.tobytes()) if len(table) else None
            os.ftruncate(fd, (start + len(table)) * self.dtype.itemsize)
            os.fsync(fd)
        finally:
            os.close(fd)
        if generation != self.generation:
            fsync_dir(self.folder)
        return {"generation": generation, "records": start + len(table), "record_bytes": self.dtype.itemsize}

    def commit(self, state: dict) -> None:
        """The checkpoint naming `state` is durable: keep its generation and the one before."""
        self.generation, self.records = state["generation"], state["records"]
        self._drop(lambda g: g < self.generation - 1)

    def _records(self, slots: np.ndarray) -> np.ndarray:
        b = self.buffer
        table = np.zeros(len(slots), self.dtype)
        table["slot"], table["y"], table["task"], table["x"] = slots, b.y[slots], b.task[slots], b.x[slots]
        if b.store_logits:
            table["logits"] = b.logits[slots]
        raw = table.view(np.uint8).reshape(len(slots), self.dtype.itemsize)
        table["crc"] = [zlib.crc32(row[:-4].tobytes()) for row in raw]
        return table

    def _drop(self, doomed) -> None:
        for path in self.folder.glob("buffer-*.log"):
            match = LOG_RE.fullmatch(path.name)
            if match and doomed(int(match.group(1))):
                path.unlink(missing_ok=True)
