"""The machine's memory, and the check that an allocation fits it before anything is allocated.

A replay buffer is preallocated in one piece; a size beyond the machine's memory fails
deep inside numpy (`Unable to allocate 8.37 TiB`) or, below the kernel's overcommit limit,
gets the process killed when the buffer fills. `check_fits` refuses it up front with the
bytes asked, the machine's memory and what is accepted. On a board the agent runs the same
check for its own machine.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class MachineMemory:
    """Physical memory of this machine and what is available to a new allocation now, in bytes.

    Either is None where the operating system does not tell (then nothing is checked against it).
    """

    total_bytes: int | None
    available_bytes: int | None

    def describe(self) -> str:
        avail = "unknown" if self.available_bytes is None else human_bytes(self.available_bytes)
        total = "unknown" if self.total_bytes is None else human_bytes(self.total_bytes)
        return f"{avail} available of {total} total"


def machine_memory(meminfo: str | Path = "/proc/meminfo", cgroup: str | Path = "/sys/fs/cgroup") -> MachineMemory:
    """Total and available memory: Linux /proc/meminfo (MemTotal, MemAvailable), capped by a cgroup v2
    limit (memory.max - memory.current, what a container may still take), else os.sysconf.
    """
    fields = {}
    try:
        for line in Path(meminfo).read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("MemTotal", "MemAvailable") and rest.split():
                fields[name] = int(rest.split()[0]) * 1024  # the kernel writes kB, meaning KiB
    except (OSError, ValueError):
        pass
    total, available = fields.get("MemTotal"), fields.get("MemAvailable")
    if total is None:
        total = _sysconf_bytes("SC_PHYS_PAGES")
    if available is None:
        available = _sysconf_bytes("SC_AVPHYS_PAGES")
    limit = _cgroup_room(Path(cgroup))
    if limit is not None:
        total = limit[0] if total is None else min(total, limit[0])
        available = limit[1] if available is None else min(available, limit[1])
    return MachineMemory(total, available)


def check_fits(what: str, nbytes: int, limit_name: str, unit_bytes: int = 1, unit: str = "B",
               memory: MachineMemory | None = None) -> None:
    """Refuse an allocation of `nbytes` that this machine's available memory cannot hold.

    Args:
        what: the request as the user gave it, e.g. "buffer=1000000000000 examples (306 B each)".
        nbytes: bytes it would allocate.
        limit_name, unit_bytes, unit: how to say what is accepted: `limit_name` <= available //
            unit_bytes `unit` (e.g. "buffer", 306, "examples").
        memory: the machine's memory (default: `machine_memory()`).
    Raises:
        ValueError: naming the request, its bytes, the machine's memory and what is accepted.
    """
    memory = machine_memory() if memory is None else memory
    if memory.available_bytes is None or nbytes <= memory.available_bytes:
        return
    most = memory.available_bytes // unit_bytes
    limit = f"{most:,} B ({human_bytes(most)})" if unit == "B" else f"{most:,} {unit}"
    raise ValueError(f"{what} is {nbytes:,} B ({human_bytes(nbytes)}), more than this machine has: "
                     f"{memory.describe()}; accepted: {limit_name} <= {limit}")


def human_bytes(n: int) -> str:
    """'8.37 TiB'-style: the largest binary unit that keeps the number >= 1."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{n} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} TiB"


def _sysconf_bytes(pages: str) -> int | None:
    try:
        return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not POSIX, or the name is unknown here (macOS: SC_AVPHYS_PAGES)
        return None


def _cgroup_room(root: Path) -> tuple[int, int] | None:
    """(limit, limit - current) of this process's cgroup v2, or None without a limit."""
    try:
        limit = (root / "memory.max").read_text().strip()
        current = int((root / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    if limit == "max" or not limit.isdigit():
        return None
    return int(limit), max(0, int(limit) - current)
