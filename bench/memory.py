"""`bench memory`: peak resident memory of a short training run in a fresh process, per engine.

Each engine trains `steps` SGD steps on the same batch in a new interpreter (see
`edgecl.bench.fresh_process`): the portable and ort-training engines in runtime-only
processes (numpy + onnxruntime + edgecl.runtime; torch never imported, checked in the
child), torch eager in a process that imports torch and the model definition only. The
peak is the child's high-water mark (Linux VmHWM, else ru_maxrss) at the end of the run;
the resident set of the bare interpreter and after the imports say how much of it is
libraries rather than training.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile

from .fresh_process import ENGINES, check_engines, check_seed_and_python, prepare, rows_csv, run_fresh
from .subject import Subject, check_cache_dir, resolve_config_fields

ROW_FIELDS = ("model", "engine", "process", "target", "source", "peak_rss_bytes", "ratio_to_torch",
              "imports_rss_bytes", "interpreter_rss_bytes", "torch_imported")


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """What `measure_memory` measures.

    Args:
        model / input_shape / batch / threads / engines / num_classes / artifacts: as in
            `edgecl.bench.latency.LatencyConfig` (engines None with a device: the portable engine).
        steps: training steps of each run. repeats: runs per engine (the median peak is kept).
        target: label of the machine measured. runtime_python: interpreter of the
            runtime-only children (default: this one), e.g. a venv with stock onnxruntime.
        device: "serial:PORT" (a pyserial URL) to measure the portable engine's fresh process
            on the board whose agent listens there; None: this machine.
    Raises:
        ValueError: naming the bad field and what is accepted (both fields of a contradiction).
        ArtifactError: `artifacts` is not a loadable export.
    """

    model: str | None = None
    input_shape: tuple | None = None
    batch: int = 32
    threads: int = 2
    steps: int = 20
    repeats: int = 1
    engines: tuple | None = None
    target: str = "host"
    seed: int = 0
    runtime_python: str | None = None
    device: str | None = None
    num_classes: int | None = None
    artifacts: str | None = None

    def __post_init__(self):
        # on a board, by default the engine its artifacts are for
        resolve_config_fields(self, ("portable",) if self.device is not None else ENGINES)
        object.__setattr__(self, "engines", check_engines(self.engines))
        check_seed_and_python(self.seed, self.runtime_python)
        if self.device is not None:
            if not (str(self.device).startswith("serial:") and self.serial_port):
                raise ValueError(f"device={self.device!r}; accepted: serial:PORT with a pyserial URL "
                                 "(serial:/dev/ttyUSB0, serial:socket://host:4000); memory is measured, never projected")
            if self.engines != ("portable",) or self.runtime_python is not None or self.batch < 2:
                raise ValueError(f"engines={list(self.engines)}, runtime_python={self.runtime_python!r}, "
                                 f"batch={self.batch} with device={self.device!r}; accepted: engines ['portable'], "
                                 "no runtime_python (the board's own Python runs it), batch >= 2")
        for name in ("batch", "threads", "steps", "repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; accepted: an integer >= 1")
        if not isinstance(self.target, str) or not self.target:
            raise ValueError(f"target={self.target!r}; accepted: a non-empty label such as 'host'")

    @property
    def subject(self) -> Subject:
        """What is measured (the resolved model, input, classes, or the artifact folder)."""
        return Subject.of(self.model, self.input_shape, self.num_classes, self.artifacts, self.engines)

    @property
    def serial_port(self) -> str | None:
        """PORT of device 'serial:PORT', else None."""
        return str(self.device)[len("serial:"):] if self.device is not None else None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["input_shape"], d["engines"] = list(self.input_shape), list(self.engines)
        return d


@dataclasses.dataclass(frozen=True)
class MemoryRow:
    """One engine's process: peak resident bytes (median over repeats) and its ratio to torch eager's."""

    model: str
    engine: str
    process: str  # "runtime-only" or "torch-eager"
    target: str
    source: str
    peak_rss_bytes: int
    ratio_to_torch: float | None
    imports_rss_bytes: int | None  # resident after the imports, before the model is opened
    interpreter_rss_bytes: int | None  # resident in the bare interpreter
    torch_imported: bool

    def __post_init__(self):
        if self.peak_rss_bytes <= 0:
            raise ValueError(f"peak_rss_bytes={self.peak_rss_bytes!r}; accepted: > 0")
        if self.source != "measured":
            raise ValueError(f"source={self.source!r}; accepted: 'measured'")


@dataclasses.dataclass(frozen=True)
class MemoryResult:
    """Result of `measure_memory`: one row per engine."""

    config: MemoryConfig
    rows: tuple

    def row(self, engine: str) -> MemoryRow:
        """The row of `engine`. Raises KeyError naming the engines present."""
        for r in self.rows:
            if r.engine == engine:
                return r
        raise KeyError(f"no row for {engine!r}; engines: {', '.join(r.engine for r in self.rows)}")

    def to_dict(self) -> dict:
        return {"kind": "memory", "rows": [dataclasses.asdict(r) for r in self.rows], **self.config.to_dict()}


def _median_int(values) -> int | None:
    values = [v for v in values if v is not None]
    return int(statistics.median(values)) if values else None


def measure_memory(config: MemoryConfig = MemoryConfig(), cache_dir=None) -> MemoryResult:
    """Export once (host side, torch) or take `config.artifacts` as they are (no torch), then run
    `steps` training steps per engine in fresh processes.

    Args:
        config: what to measure. cache_dir: a folder to keep bench's exports in and reuse them
            from (see `edgecl.bench.fresh_process.prepare`); None: a temporary folder. Never the
            user's export: that is `config.artifacts`, only read.

    Returns:
        MemoryResult: peak resident bytes per engine (median over `repeats` runs), with the
        ratio to torch eager's peak when "torch" is among the engines. With a serial device:
        one row, the portable engine's process on the board (no torch there, so no ratio).
    Raises:
        ValueError: a cache_dir with `config.artifacts`, or one that is an export itself
            (`edgecl.bench.subject.check_cache_dir`). RuntimeError: a fresh process failed (its error
            shown). EdgeclError: the board's link or agent failed (edgecl.devices).
    """
    cache_dir = check_cache_dir(cache_dir, config.subject)  # before measuring: exports are kept there
    if config.serial_port is not None:
        return _measure_on_board(config, cache_dir)
    reports = {name: [] for name in config.engines}
    names = list(config.engines)
    with tempfile.TemporaryDirectory(prefix="edgecl-memory-") as tmp:
        prepared = prepare(config.subject, config.batch, config.engines, cache_dir or tmp, config.seed)
        for r in range(config.repeats):
            turn = r % len(names)
            for name in names[turn:] + names[:turn]:
                reports[name].append(run_fresh(prepared, name, config.steps, config.threads, config.runtime_python))
    peaks = {name: _median_int(c.peak_rss_bytes for c in rs) for name, rs in reports.items()}
    base = peaks.get("torch")
    rows = tuple(MemoryRow(prepared.model, name, rs[0].process, config.target, "measured", peaks[name],
                           peaks[name] / base if base else None, _median_int(c.imports_rss_bytes for c in rs),
                           _median_int(c.interpreter_rss_bytes for c in rs), any(c.torch_imported for c in rs))
                 for name, rs in reports.items())
    return MemoryResult(config, rows)


def _measure_on_board(config: MemoryConfig, cache_dir=None) -> MemoryResult:
    """Export here, push once, then `repeats` fresh runtime-only processes measured by the agent on the board."""
    from edgecl.devices.host import push_for_bench, connect

    with tempfile.TemporaryDirectory(prefix="edgecl-memory-") as tmp:
        prepared = prepare(config.subject, config.batch, ("portable",), cache_dir or tmp, config.seed)
        with connect(config.serial_port) as device:
            name = push_for_bench(device, prepared.artifacts["portable"])
            runs = [device.probe_process(name, config.batch, config.steps, config.threads)
                    for _ in range(config.repeats)]
    row = MemoryRow(prepared.model, "portable", "runtime-only", f"board:{runs[0].machine}", "measured",
                    _median_int(r.peak_rss_bytes for r in runs), None, _median_int(r.imports_rss_bytes for r in runs),
                    _median_int(r.interpreter_rss_bytes for r in runs), any(r.torch_imported for r in runs))
    return MemoryResult(config, (row,))


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def format_table(result: MemoryResult) -> str:
    """A human table in MiB: peak, ratio to torch eager, and the resident set after the imports."""
    c = result.config
    where = f", on the board at {c.serial_port}" if c.serial_port is not None else ""
    lines = [f"{c.subject.label} {'x'.join(map(str, c.input_shape))}, batch {c.batch}, {c.threads} threads, {c.steps} "
             f"training steps in a fresh process per engine{where}, median of {c.repeats}",
             f"{'engine':<14}{'process':<14}{'target':<16}{'peak MiB':>9}{'vs torch':>10}{'imports MiB':>13}"
             f"{'python MiB':>12}  torch imported"]
    for r in result.rows:
        ratio = f"{r.ratio_to_torch:.2f}x" if r.ratio_to_torch is not None else "-"
        lines.append(f"{r.engine:<14}{r.process:<14}{r.target:<16}{_mib(r.peak_rss_bytes):>9}{ratio:>10}"
                     f"{_mib(r.imports_rss_bytes):>13}{_mib(r.interpreter_rss_bytes):>12}  "
                     f"{'yes' if r.torch_imported else 'no'}")
    return "\n".join(lines)


def to_csv(result: MemoryResult) -> str:
    """The rows as CSV (header: ROW_FIELDS)."""
    return rows_csv(result.rows, ROW_FIELDS)


__all__ = ["MemoryConfig", "MemoryResult", "MemoryRow", "format_table", "measure_memory", "to_csv"]
