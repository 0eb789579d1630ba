"""Device profiles as data: compute, memory and bandwidth figures, each marked measured or datasheet.

A profile is a frozen dataclass that round-trips to a dict and to TOML, so a user adds a
board by writing one small file (`load_profile(path)`). The built-in boards live in
`devices/profiles/*.toml` with the datasheet each figure comes from; the host CPU is
measured by `probe_host` (a float32 matmul and a large array copy, about a second).
Projections from a profile (`edgecl.devices.roofline`) are always labelled "projected".
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
import tomllib
from enum import Enum
from pathlib import Path

import numpy as np

BUILTIN_DIR = Path(__file__).parent / "profiles"
FIGURES = ("cores", "ram_bytes", "peak_gflops", "bandwidth_gbps")
REQUIRED_KEYS = ("name", "description", "arch", "kind", *FIGURES)


class Provenance(str, Enum):
    """Where a figure comes from."""

    MEASURED = "measured"
    DATASHEET = "datasheet"


class DeviceKind(str, Enum):
    CPU = "cpu"
    GPU = "gpu"


@dataclasses.dataclass(frozen=True)
class Figure:
    """One number of a profile, with its provenance and where it comes from (datasheet, derivation, probe).

    Raises:
        ValueError: a value that is not a finite number > 0, an unknown source.
    """

    value: float
    source: Provenance
    reference: str = ""

    def __post_init__(self):
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not (
                np.isfinite(self.value) and self.value > 0):
            raise ValueError(f"figure value={self.value!r}; accepted: a finite number > 0")
        try:
            object.__setattr__(self, "source", Provenance(self.source))
        except ValueError:
            raise ValueError(f"figure source={self.source!r}; accepted: "
                             f"{', '.join(p.value for p in Provenance)}") from None
        if not isinstance(self.reference, str):
            raise ValueError(f"figure reference={self.reference!r}; accepted: a string")

    def to_dict(self) -> dict:
        return {"value": self.value, "source": self.source.value, "reference": self.reference}


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """A compute target: what a roofline projection needs, and where each figure comes from.

    Attributes:
        name: lookup key (lower case, digits, '-' and '_'), e.g. "raspberry-pi-5".
        description: board, SoC and clocks in words.
        arch: instruction set or programming model ("aarch64", "x86_64", "cuda").
        kind: cpu or gpu.
        cores: cores used (CPU cores, or CUDA cores for a GPU).
        ram_bytes: memory of the board in bytes.
        peak_gflops: float32 peak in GFLOP/s (1e9 FLOP/s).
        bandwidth_gbps: memory bandwidth in GB/s (1e9 bytes/s).
    Raises:
        ValueError: a bad name, kind or figure.
    """

    name: str
    description: str
    arch: str
    kind: DeviceKind
    cores: Figure
    ram_bytes: Figure
    peak_gflops: Figure
    bandwidth_gbps: Figure

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or not all(
                c.islower() or c.isdigit() or c in "-_" for c in self.name):
            raise ValueError(f"profile name={self.name!r}; accepted: lower-case letters, digits, '-' and '_'")
        for key in ("description", "arch"):
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"profile {self.name!r}: {key}={getattr(self, key)!r}; accepted: a string")
        try:
            object.__setattr__(self, "kind", DeviceKind(self.kind))
        except ValueError:
            raise ValueError(f"profile {self.name!r}: kind={self.kind!r}; accepted: "
                             f"{', '.join(k.value for k in DeviceKind)}") from None
        for key in FIGURES:
            value = getattr(self, key)
            if isinstance(value, dict):
                object.__setattr__(self, key, _figure(self.name, key, value))
            elif not isinstance(value, Figure):
                raise ValueError(f"profile {self.name!r}: {key}={value!r}; accepted: a Figure or a table with "
                                 f"value, source, reference")

    @property
    def measured(self) -> bool:
        """True when every figure is measured (the host), False when any comes from a datasheet."""
        return all(getattr(self, key).source is Provenance.MEASURED for key in FIGURES)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "arch": self.arch, "kind": self.kind.value,
                **{key: getattr(self, key).to_dict() for key in FIGURES}}

    @classmethod
    def from_dict(cls, d: dict, where: str = "profile") -> DeviceProfile:
        """Build from a dict (as `to_dict` or a TOML file gives).

        Raises:
            ValueError: a missing or unknown key (named), or a bad value.
        """
        if not isinstance(d, dict):
            raise ValueError(f"{where}: {type(d).__name__}; accepted: a table of {', '.join(REQUIRED_KEYS)}")
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise ValueError(f"{where} lacks key(s) {missing}; required: {', '.join(REQUIRED_KEYS)}")
        unknown = sorted(set(d) - set(REQUIRED_KEYS))
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {unknown}; accepted: {', '.join(REQUIRED_KEYS)}")
        name = d["name"]
        return cls(name, d["description"], d["arch"], d["kind"],
                   *(_figure(f"{where} ({name!r})", key, d[key]) for key in FIGURES))

    def to_toml(self) -> str:
        """TOML text that `load_profile` reads back to an equal profile."""
        lines = [f"{key} = {_toml_value(getattr(self, key) if key != 'kind' else self.kind.value)}"
                 for key in ("name", "description", "arch", "kind")]
        for key in FIGURES:
            lines += ["", f"[{key}]"] + [f"{k} = {_toml_value(v)}" for k, v in getattr(self, key).to_dict().items()]
        return "\n".join(lines) + "\n"


def _figure(where: str, key: str, table) -> Figure:
    if not isinstance(table, dict):
        raise ValueError(f"{where}: {key} = {table!r}; accepted: a table with value, source, reference")
    missing = [k for k in ("value", "source") if k not in table]
    if missing:
        raise ValueError(f"{where}: [{key}] lacks key(s) {missing}; required: value, source (reference optional)")
    unknown = sorted(set(table) - {"value", "source", "reference"})
    if unknown:
        raise ValueError(f"{where}: [{key}] has unknown key(s) {unknown}; accepted: value, source, reference")
    try:
        return Figure(table["value"], table["source"], table.get("reference", ""))
    except ValueError as e:
        raise ValueError(f"{where}: [{key}] {e}") from None


def _toml_value(v) -> str:
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string (same escapes)
    if isinstance(v, float):
        return repr(v)
    return str(v)


def load_profile(path: str | Path) -> DeviceProfile:
    """Read one profile from a TOML file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: malformed TOML (the parser's message and the path), a missing key (named), a bad value.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"profile file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"profile file {str(path)!r} is not valid TOML: {e}") from None
    return DeviceProfile.from_dict(data, where=f"profile file {str(path)!r}")


def save_profile(profile: DeviceProfile, path: str | Path) -> Path:
    """Write `profile` as TOML; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile.to_toml())
    return path


def builtin_profiles() -> dict[str, DeviceProfile]:
    """The boards shipped with edgecl (datasheet figures), by name, in file-name order."""
    profiles = [load_profile(p) for p in sorted(BUILTIN_DIR.glob("*.toml"))]
    return {p.name: p for p in profiles}


def find_profile(name: str, profiles: dict[str, DeviceProfile]) -> DeviceProfile:
    """The profile called `name`.

    Raises:
        ValueError: no profile of that name (the accepted names listed).
    """
    if name not in profiles:
        accepted = [*profiles, *(["host"] if "host" not in profiles else [])]
        raise ValueError(f"device profile {name!r} is unknown; accepted: {', '.join(accepted)} "
                         f"('host' is measured on this machine; add your own with --profile FILE.toml)")
    return profiles[name]


# --- the host, measured -------------------------------------------------------------------


def _best_rate(work, amount: float, seconds: float) -> float:
    """Best amount/second of `work()` over repeats filling about `seconds` (after one warm-up call)."""
    work()
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        work()
        best = max(best, amount / (time.perf_counter() - t0))
        if time.perf_counter() >= deadline:
            return best


def _limit_blas_threads(threads: int):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # numpy then uses its BLAS default; the reference says so
        return None
    return threadpool_limits(limits=threads, user_api="blas")


def probe_host(threads: int = 2, seconds: float = 0.5, matmul_n: int = 512, copy_mib: int = 64,
               name: str = "host") -> DeviceProfile:
    """Measure this machine: float32 matmul GFLOP/s at `threads` BLAS threads, copy bandwidth, cores, RAM.

    The matmul rate is the best of repeated (n x n) @ (n x n) products (2 n^3 FLOPs each);
    the bandwidth the best of repeated copies of a `copy_mib` MiB array, counting the read
    and the write (2 x size bytes per copy). Each probe runs about `seconds`.

    Args:
        threads: BLAS threads for the matmul (threadpoolctl; numpy's default if it is absent).
        seconds: time spent on each of the two probes.
        matmul_n: matrix side. copy_mib: array size in MiB (well above the last-level cache).
        name: the profile name.
    Returns:
        a DeviceProfile whose figures are all marked measured.
    Raises:
        ValueError: threads < 1, seconds <= 0, sizes < 1.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={threads!r}; accepted: an integer >= 1")
    if not seconds > 0 or matmul_n < 1 or copy_mib < 1:
        raise ValueError(f"seconds={seconds!r}, matmul_n={matmul_n!r}, copy_mib={copy_mib!r}; accepted: all > 0")
    rng = np.random.default_rng(0)
    a = rng.random((matmul_n, matmul_n), dtype=np.float32)
    b = rng.random((matmul_n, matmul_n), dtype=np.float32)
    out = np.empty_like(a)
    limiter = _limit_blas_threads(threads)
    try:
        flops = _best_rate(lambda: np.matmul(a, b, out=out), 2.0 * matmul_n**3, seconds)
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
    src = np.ones(copy_mib * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    bandwidth = _best_rate(lambda: np.copyto(dst, src), 2.0 * src.nbytes, seconds)
    blas = f"{threads} BLAS threads" if limiter is not None else "numpy's default BLAS threads (no threadpoolctl)"
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cores = os.cpu_count() or 1
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    m = Provenance.MEASURED
    return DeviceProfile(
        name, f"this machine ({platform.processor() or platform.machine()}), probed {when}", platform.machine(), "cpu",
        Figure(cores, m, "os.cpu_count()"),
        Figure(ram or 1, m, "os.sysconf: SC_PAGE_SIZE x SC_PHYS_PAGES"),
        Figure(round(flops / 1e9, 2), m, f"best float32 {matmul_n}x{matmul_n} matmul, {blas}, {when}"),
        Figure(round(bandwidth / 1e9, 2), m, f"best copy of a {copy_mib} MiB float32 array (read + write), {when}"))


def host_profile(cache: str | Path | None = None, probe: bool = False, threads: int = 2) -> DeviceProfile:
    """The host's measured profile: read from `cache` if it exists and `probe` is False, else probed (and cached).

    Args:
        cache: TOML file to keep the measurement in (None: always probe, keep nothing).
        probe: measure again even when the cache exists.
        threads: BLAS threads for the matmul probe.
    """
    if cache is not None and not probe and Path(cache).is_file():
        return load_profile(cache)
    profile = probe_host(threads)
    if cache is not None:
        save_profile(profile, cache)
    return profile


def all_profiles(extra_files=(), host: DeviceProfile | None = None) -> dict[str, DeviceProfile]:
    """Built-ins, then the host (if given), then user files (a user file may replace a built-in of the same name)."""
    profiles = builtin_profiles()
    if host is not None:
        profiles[host.name] = host
    for path in extra_files:
        p = load_profile(path)
        profiles[p.name] = p
    return profiles
