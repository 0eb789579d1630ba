"""`bench latency`: training-step, inference and cold-start latency of each engine against torch eager.

Same model, same batch, same threads for every engine. Steps and forward passes are timed
in one process, the engines taking turns call by call (the order rotating each round), so
a slow spell of a shared machine lands on every engine alike; medians and interquartile
ranges summarise the calls. Cold start is timed in fresh processes (see
`edgecl.bench.fresh_process`): from the spawn of the interpreter to the end of its first
training step, a runtime-only process (torch never imported, checked in the child) against
a torch-eager one, repeated and summarised by the median.

With channel densities (`LatencyConfig.channel_density` / `channels`, `--channel-density`,
`--channels`) the portable engine's dense step is timed against a channel-structured export's
at each density, interleaved the same way (`edgecl.bench.channel_bench`).

Every row is `source: "measured"` on `target` ("host" unless labelled otherwise); rows
projected for a device profile by the roofline (`--device NAME`) say `source: "projected"`
and are never mixed into the measured ratios.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile

import numpy as np

from .latency_rows import (PHASES, ColdStartDetail, LatencyResult, LatencyRow,  # noqa: F401 (re-exported)
                           interleaved_ms, summary_ms)
from .fresh_process import ENGINES, MODEL_NAMES, check_engines, check_seed_and_python, prepare, rows_csv, run_fresh
from .subject import Subject, check_cache_dir, resolve_config_fields

ROOFLINE_ENGINE = "roofline"  # projected rows: the roofline does not tell engines apart
ROW_FIELDS = ("model", "engine", "target", "source", "phase", "median_ms", "iqr_ms", "ratio_to_torch")


@dataclasses.dataclass(frozen=True)
class LatencyConfig:
    """What `measure_latency` measures.

    Args:
        model: one of MODEL_NAMES, or FILE.py:FUNCTION (the user's function returning an nn.Module,
            called with no arguments); None: "cnn", or none with `artifacts`.
        input_shape: one sample (C, H, W) (any shape for the MLP); None: (1, 8, 8) for a built-in
            family, required for a model file, the manifest's with `artifacts`.
        batch: samples per step. threads: intra-op threads of every engine.
        repeats: timed calls per engine and phase. warmup: untimed calls before them.
        cold_starts: fresh processes per engine (0: no cold-start rows).
        engines: names among ENGINES (None: all; with `artifacts`: the export's own engine, the only
            one accepted; with channels: portable, the only one accepted); ratios need "torch".
        phases: among PHASES (None: all of them; with channels: train and infer).
        target: label of the machine measured. device: a device profile name for projected rows.
        runtime_python: interpreter for the runtime-only children (default: this one).
        num_classes: logits width (None: 10, the manifest's with `artifacts`).
        artifacts: the user's export to bench as it is (read only, no torch needed), instead of a model.
        channel_density: shares in (0, 1] of every channel set (`edgecl.bench.channel_bench`): one row
            each, a channel-structured export's step against the dense portable one. channels: a file
            of active channels (an engine state .npz or JSON {set: [indices]}) for one more row.
    Raises:
        ValueError: naming the bad field and what is accepted; `artifacts` with a model, or with an
            input_shape, num_classes or engines other than its manifest's, naming both.
        ArtifactError: `artifacts` is not a loadable export.
    """

    model: str | None = None
    input_shape: tuple | None = None
    batch: int = 32
    threads: int = 2
    repeats: int = 50
    warmup: int = 5
    cold_starts: int = 3
    engines: tuple | None = None
    phases: tuple | None = None
    target: str = "host"
    device: str | None = None
    seed: int = 0
    runtime_python: str | None = None
    num_classes: int | None = None
    artifacts: str | None = None
    channel_density: tuple | None = None
    channels: str | None = None

    def __post_init__(self):
        narrowed = self.channel_density is not None or self.channels is not None
        resolve_config_fields(self, ("portable",) if narrowed and self.artifacts is None else ENGINES)
        if self.phases is None:
            object.__setattr__(self, "phases", ("train", "infer") if narrowed else PHASES)
        object.__setattr__(self, "engines", check_engines(self.engines))
        check_seed_and_python(self.seed, self.runtime_python)
        for name, low in (("batch", 1), ("threads", 1), ("repeats", 1), ("warmup", 0), ("cold_starts", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r}; accepted: an integer >= {low}")
        phases = tuple(self.phases)
        if not phases or any(p not in PHASES for p in phases) or len(set(phases)) != len(phases):
            raise ValueError(f"phases={list(phases)}; accepted: distinct names among {', '.join(PHASES)}")
        object.__setattr__(self, "phases", phases)
        if not isinstance(self.target, str) or not self.target:
            raise ValueError(f"target={self.target!r}; accepted: a non-empty label such as 'host'")
        if self.serial_port is not None and not self.serial_port:
            raise ValueError(f"device={self.device!r}; accepted: serial:PORT with a pyserial URL "
                             "(serial:/dev/ttyUSB0, serial:socket://host:4000) or a device profile name")
        if narrowed:  # after the phases: cold starts are refused there
            from .channel_bench import check_channel_config

            check_channel_config(self)
        if self.serial_port is not None and self.artifacts is not None and self.engines != ("portable",):
            raise ValueError(f"engines={list(self.engines)} with device={self.device!r}: the board trains with the "
                             "portable engine; accepted: artifacts exported for it")

    @property
    def subject(self) -> Subject:
        """What is measured (the resolved model, input, classes, or the artifact folder)."""
        return Subject.of(self.model, self.input_shape, self.num_classes, self.artifacts, self.engines)

    @property
    def serial_port(self) -> str | None:
        """PORT of device 'serial:PORT' (measure on the board there), else None."""
        if self.device is not None and str(self.device).startswith("serial:"):
            return str(self.device)[len("serial:"):]
        return None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["input_shape"], d["engines"], d["phases"] = list(self.input_shape), list(self.engines), list(self.phases)
        d["channel_density"] = None if self.channel_density is None else list(self.channel_density)
        return d


def _open_engines(config: LatencyConfig, prepared) -> dict:
    from edgecl.runtime import open_engine

    engines = {}
    for name in config.engines:
        if name == "torch":
            from edgecl.exporters.reference import TorchEngine

            net = prepared.torch_model
            if prepared.artifacts:  # same parameters, masks and trainable set as the export
                engines[name] = TorchEngine.from_artifacts(net, next(iter(prepared.artifacts.values())),
                                                           threads=config.threads)
            else:
                engines[name] = TorchEngine(net, config.input_shape, config.num_classes, threads=config.threads)
        else:
            engines[name] = open_engine(prepared.artifacts[name], threads=config.threads)
    return engines


def _rows(config: LatencyConfig, phase: str, times: dict[str, list[float]]) -> list[LatencyRow]:
    summary = {name: summary_ms(t) for name, t in times.items()}
    base = summary.get("torch", (None,))[0]
    return [LatencyRow(config.subject.label, name, config.target, "measured", phase, med, iqr,
                       med / base if base else None) for name, (med, iqr) in summary.items()]


def _cold_starts(config: LatencyConfig, prepared) -> tuple[list[LatencyRow], list[ColdStartDetail]]:
    reports = {name: [] for name in config.engines}
    names = list(config.engines)
    for r in range(config.cold_starts):  # engines take turns here too
        turn = r % len(names)
        for name in names[turn:] + names[:turn]:
            reports[name].append(run_fresh(prepared, name, 1, config.threads, config.runtime_python))
    rows = _rows(config, "cold_start", {n: [c.first_step_ms for c in rs] for n, rs in reports.items()})
    detail = [ColdStartDetail(n, rs[0].process, len(rs), *(statistics.median(getattr(c, f) for c in rs) for f in
                                                           ("python_ms", "imports_ms", "open_ms", "first_step_ms")),
                              any(c.torch_imported for c in rs)) for n, rs in reports.items()]
    return rows, detail


def resolve_device(name: str, threads: int = 2):
    """The device profile called `name` (built-ins, or the measured host), None when edgecl.devices lacks them.

    Raises:
        ValueError: an unknown profile name (the known names listed).
    """
    try:
        from edgecl.bench.devices_table import devices_table
    except ImportError:
        return None
    # the host is measured once and cached (`bench devices`); only probed when asked for
    return devices_table(host=name == "host", threads=threads).get(name)


def projected_rows(config: LatencyConfig, profile, layers: list) -> tuple[list[LatencyRow], str]:
    """Roofline rows for `profile` (train: one dense SGD step; infer: its forward phase), and a note.

    Args:
        profile: a DeviceProfile, or None (then no rows, and a note saying why).
        layers: the model's layer table (edgecl.exporters.layers.layer_table).
    """
    try:
        from edgecl.devices.roofline import project_latency
    except ImportError as e:
        profile, why = None, str(e)
    else:
        why = "edgecl.devices.profiles is unavailable"
    if profile is None:
        return [], f"no projection for {config.device!r}: {why}"
    from edgecl.runtime.flops import training_run_flops

    step = training_run_flops(layers, batch=config.batch, examples_per_epoch=config.batch).step
    projection = project_latency(layers, step, profile)
    label = config.subject.label
    rows = [LatencyRow(label, ROOFLINE_ENGINE, profile.name, "projected", "train", projection.per_step_ms,
                       0.0, None),
            LatencyRow(label, ROOFLINE_ENGINE, profile.name, "projected", "infer",
                       projection.phase_ms("forward") / projection.steps, 0.0, None)]
    note = (f"projected for {profile.name} by a per-layer roofline ({profile.peak_gflops.value} GFLOP/s, "
            f"{profile.bandwidth_gbps.value} GB/s): Conv2d/Linear work only, a lower bound, not a measurement")
    return rows, note


def measure_latency(config: LatencyConfig = LatencyConfig(), cache_dir=None) -> LatencyResult:
    """Export once (or take `config.artifacts` as they are), then time training steps, forward passes and
    cold starts of each engine.

    Exporting is host side (torch); `config.artifacts` needs no torch (a runtime-only environment
    benches them too). OMP_WAIT_POLICY is set to PASSIVE unless set, before torch loads, so
    torch's idle threads sleep as ONNX Runtime's do (no spinning).

    Args:
        config: what to measure. cache_dir: a folder to keep bench's exports in and reuse them
            from (see `edgecl.bench.fresh_process.prepare`); None: a temporary folder. Never the
            user's export: that is `config.artifacts`, only read.

    Returns:
        LatencyResult: measured rows per engine and phase (ms; ratios to torch eager when
        "torch" is among the engines), cold-start detail, projected rows for config.device;
        with channel densities, the dense portable rows and the channel rows
        (`edgecl.bench.channel_bench.measure_channel_latency`).
    Raises:
        ValueError: a device profile that does not exist; a cache_dir with `config.artifacts`, or one
            that is an export itself (`edgecl.bench.subject.check_cache_dir`). RuntimeError: a fresh
            process failed.
    """
    cache_dir = check_cache_dir(cache_dir, config.subject)  # before measuring: exports are kept there
    if config.channels is not None or config.channel_density is not None:
        from .channel_bench import measure_channel_latency

        return measure_channel_latency(config, cache_dir)
    if config.serial_port is not None:
        return _measure_on_board(config, cache_dir)
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # libgomp reads it once, when torch loads it
    policy = os.environ.get("OMP_WAIT_POLICY", "libgomp default (spinning)")
    profile = resolve_device(config.device, config.threads) if config.device is not None else None  # bad names fail first
    rows, detail, note = [], [], ""
    with tempfile.TemporaryDirectory(prefix="edgecl-latency-") as tmp:
        prepared = prepare(config.subject, config.batch, config.engines, cache_dir or tmp, config.seed)
        with np.load(prepared.batch_file) as z:
            x, y = z["x"], z["y"]
        if {"train", "infer"} & set(config.phases):
            engines = _open_engines(config, prepared)
            if "train" in config.phases:
                calls = {n: (lambda e=e: e.step(x, y)) for n, e in engines.items()}
                rows += _rows(config, "train", interleaved_ms(calls, config.warmup, config.repeats))
            if "infer" in config.phases:
                calls = {n: (lambda e=e: e.evaluate(x)) for n, e in engines.items()}
                rows += _rows(config, "infer", interleaved_ms(calls, config.warmup, config.repeats))
        if "cold_start" in config.phases and config.cold_starts:
            cold_rows, detail = _cold_starts(config, prepared)
            rows += cold_rows
        if config.device is not None:
            projected, note = projected_rows(config, profile, prepared.layers())
            rows += projected
    return LatencyResult(config, tuple(rows), tuple(detail), policy, note)


def _measure_on_board(config: LatencyConfig, cache_dir=None) -> LatencyResult:
    """The portable engine's training step and forward pass timed by the agent on the board.

    The export is made here and pushed once (`edgecl.devices.host.board_latency`); the board
    has no torch, so its rows carry no ratio, and they are measured, never projected.
    """
    from edgecl.devices.host import board_latency

    with tempfile.TemporaryDirectory(prefix="edgecl-latency-") as tmp:
        prepared = prepare(config.subject, config.batch, ("portable",), cache_dir or tmp, config.seed)
        board = board_latency(config.serial_port, prepared.artifacts["portable"], config.batch, config.repeats,
                              config.warmup, config.threads)
    target = f"board:{board.machine}"
    label = config.subject.label
    rows = (LatencyRow(label, "portable", target, "measured", "train", board.median_ms, board.iqr_ms, None),
            LatencyRow(label, "portable", target, "measured", "infer", board.infer_median_ms,
                       board.infer_iqr_ms, None))
    return LatencyResult(config, rows, (), "set by the board", f"measured on the board at {config.serial_port} "
                         f"({board.machine}, {board.engine} engine, {board.steps} steps) over the serial link")


def format_table(result: LatencyResult) -> str:
    """A human table: one line per phase and engine, then where the cold start goes."""
    c = result.config
    cold = f"{c.cold_starts} cold starts, " if "cold_start" in c.phases and c.cold_starts else ""
    lines = [f"{c.subject.label} {'x'.join(map(str, c.input_shape))}, batch {c.batch}, {c.threads} threads, "
             f"{c.repeats} calls per engine (after {c.warmup} warm-up), {cold}"
             f"OMP_WAIT_POLICY={result.omp_wait_policy}",
             f"{'phase':<11}{'engine':<14}{'median ms':>11}{'IQR ms':>9}{'vs torch':>10}  {'source':<10}target"]
    for r in result.rows:
        ratio = f"{r.ratio_to_torch:.2f}x" if r.ratio_to_torch is not None else "-"
        lines.append(f"{r.phase:<11}{r.engine:<14}{r.median_ms:>11.3f}{r.iqr_ms:>9.3f}{ratio:>10}  "
                     f"{r.source:<10}{r.target}")
    if result.cold_start:
        lines += ["", "cold start, median ms from spawn:  python up  imports  model open  first step  torch imported"]
        for d in result.cold_start:
            lines.append(f"  {d.engine:<14}{d.process:<14}{d.python_ms:>13.0f}{d.imports_ms:>9.0f}{d.open_ms:>12.0f}"
                         f"{d.first_step_ms:>12.0f}  {'yes' if d.torch_imported else 'no'}")
    if result.projection_note:
        lines += ["", result.projection_note]
    if result.channels:
        from .channel_bench import format_channel_rows

        lines += ["", "channel-structured graph vs the dense portable graph (load average "
                  f"{result.load_average[0]:.2f} -> {result.load_average[1]:.2f}):", *format_channel_rows(result.channels)]
    return "\n".join(lines)


def to_csv(result: LatencyResult) -> str:
    """The rows as CSV (header: ROW_FIELDS)."""
    return rows_csv(result.rows, ROW_FIELDS)


__all__ = ["ENGINES", "MODEL_NAMES", "PHASES", "LatencyConfig", "LatencyResult", "LatencyRow", "ColdStartDetail",
           "format_table", "interleaved_ms", "measure_latency", "to_csv"]
