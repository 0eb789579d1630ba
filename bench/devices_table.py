"""`bench devices`: the device profiles (built-in boards, the measured host, user TOML files) as a table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from edgecl.devices.profiles import FIGURES, DeviceProfile, all_profiles, find_profile, host_profile
from edgecl.runtime.files import prepare_output

DEFAULT_HOST_CACHE = Path.home() / ".cache" / "edgecl" / "host-profile.toml"


@dataclasses.dataclass(frozen=True)
class DevicesTable:
    """Result of `devices_table`: the profiles in display order (built-ins, host, user files)."""

    profiles: tuple[DeviceProfile, ...]

    def get(self, name: str) -> DeviceProfile:
        """The profile called `name`; ValueError listing the names otherwise."""
        return find_profile(name, {p.name: p for p in self.profiles})

    def to_dict(self) -> dict:
        return {"profiles": [p.to_dict() for p in self.profiles]}


def devices_table(profile_files=(), host: bool = True, probe: bool = False, threads: int = 2,
                  cache: str | Path | None = DEFAULT_HOST_CACHE) -> DevicesTable:
    """Collect the profiles: built-ins, the host (measured, or read from `cache`), then `profile_files`.

    Args:
        profile_files: user TOML files; one with a built-in's name replaces it.
        host: include the measured host CPU.
        probe: measure the host again even if `cache` holds a measurement.
        threads: BLAS threads of the host's matmul probe.
        cache: where the host measurement is kept (None: probe every time, keep nothing).
    Raises:
        FileNotFoundError / ValueError: a user file that is missing, malformed or incomplete.
        ValueError: a `cache` that is a folder, or that is to be written and cannot be (checked before probing).
    """
    if host and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads={threads!r}; accepted: an integer >= 1")  # also when the cache spares the probe
    if host and cache is not None:
        cache = Path(cache)
        if cache.is_dir():
            raise ValueError(f"cache={str(cache)!r} is a folder; accepted: a file path (a TOML file is written there)")
        if probe or not cache.is_file():  # the probe's result will be written there
            try:
                prepare_output(cache)
            except ValueError as e:
                raise ValueError(f"cache={str(cache)!r}: {e}") from None
    hp = host_profile(cache, probe=probe, threads=threads) if host else None
    return DevicesTable(tuple(all_profiles(profile_files, host=hp).values()))


def _fmt(profile: DeviceProfile, key: str) -> str:
    fig = getattr(profile, key)
    mark = "m" if fig.source.value == "measured" else "d"
    if key == "ram_bytes":
        return f"{fig.value / 2**30:.1f} GiB ({mark})"
    if key == "cores":
        return f"{int(fig.value)} ({mark})"
    return f"{fig.value:g} ({mark})"


def format_table(table: DevicesTable) -> str:
    """Human table; (m) = measured, (d) = datasheet."""
    heads = ("name", "kind", "arch", "cores", "RAM", "peak GFLOP/s", "bandwidth GB/s")
    rows = [(p.name, p.kind.value, p.arch, *(_fmt(p, k) for k in FIGURES)) for p in table.profiles]
    widths = [max(len(str(r[i])) for r in [heads, *rows]) for i in range(len(heads))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [heads, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("(m) measured on this machine, (d) datasheet (see each figure's reference: bench devices --json)")
    return "\n".join(lines)
