"""`bench kernels`: where an engine's training step spends its time, from ONNX Runtime's own profiler.

The engine's training-step graph (portable: `step.onnx`; ort-training: `training_model.onnx`, forward and
backward; the optimizer update is not in it) runs in a fresh runtime-only process (numpy + onnxruntime +
edgecl.runtime; torch never imported, checked in the child) with ORT's profiler on, fed as the engine feeds
it: one random batch from the seed, and the parameters (times their masks), masks and BatchNorm buffers of
the export, the same every step (no update is applied: what runs does not depend on the values). `warmup`
steps run first and are left out; of the `repeats` steps after them, ORT's profile (a JSON list of trace
events) holds one `<node>_kernel_time` event per kernel executed, its op type in `args.op_name`. Kernels are
what ORT runs after its graph optimisations: fused ops appear under ORT's names (`FusedConv`: a Conv and its
activation), and fewer kernels run than the file has nodes.

The portable session has the options of `edgecl.runtime.session`, the ort-training Module those of its
engine (without its eval graph). ORT writes a session's profile on `end_profiling()`; the training API has
no such call, so the Module is released and ORT's session destructor writes it. Profiles go to a temporary
folder, removed after.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import sys
import tempfile
import textwrap
from pathlib import Path

from edgecl.runtime.probe import child_env, run_child

from .fresh_process import check_seed_and_python, prepare
from .subject import Subject, check_cache_dir, resolve_config_fields

KERNEL_ENGINES = ("portable", "ort-training")  # torch eager runs no ONNX Runtime session
STEP_GRAPHS = {"portable": "step.onnx", "ort-training": "training_model.onnx"}

# argv[1]: JSON {artifacts, batch (an .npz with x and y), threads, warmup, repeats, prefix (of ORT's profile)}
_CHILD = "import sys, time, json\n" + textwrap.dedent("""
    cfg = json.loads(sys.argv[1])
    t_python = time.monotonic()
    import gc
    from pathlib import Path
    import numpy as np
    from edgecl.runtime.checks import check_batch
    from edgecl.runtime.manifest import load_manifest
    t_imports = time.monotonic()
    folder = Path(cfg["artifacts"])
    manifest = load_manifest(folder, verify=False)  # the parent checked every file's sha256
    with np.load(cfg["batch"]) as z:
        b = check_batch(manifest, z["x"], z["y"])  # the defaults of the loss terms, as Engine.step
    if manifest.engine == "portable":  # as edgecl.runtime.portable.PortableEngine feeds step.onnx
        from edgecl.runtime.session import ort, session_options
        options = session_options(cfg["threads"])
        with np.load(folder / "init_state.npz", allow_pickle=False) as z:
            state = {k: z[k].astype(np.float32) for k in z.files}
        for key in [k for k in state if k.startswith("mask::")]:
            state["param::" + key[len("mask::"):]] *= state[key]
        feed = {"x": b.x, "y": b.y, "sample_weight": b.sample_weight, "target_logits": b.target_logits,
                "logit_weight": b.logit_weight}
        feed.update({k: state[k] for k in manifest.extra["step_inputs"] if k not in feed})
        outputs = manifest.extra["step_outputs"]
        options.enable_profiling, options.profile_file_prefix = True, cfg["prefix"]
        session = ort.InferenceSession(str(folder / "step.onnx"), options, providers=["CPUExecutionProvider"])
        def run():
            return session.run(outputs, feed)
    else:  # as edgecl.runtime.ort_training.OrtTrainingEngine runs its Module (private helpers: same options)
        from edgecl.runtime.ort_training import OrtTrainingEngine, _training_api, onnxruntime as ort
        api = _training_api()
        options = OrtTrainingEngine._session_options(cfg["threads"])
        options.enable_profiling, options.profile_file_prefix = True, cfg["prefix"]
        state = api.CheckpointState.load_checkpoint(folder / "checkpoint")
        graph = manifest.extra["param_graph_names"]
        for name, mask in manifest.extra["mask_graph_names"].items():
            state.parameters[graph[name]].data[...] *= state.parameters[mask].data
        module = api.Module(folder / "training_model.onnx", state, None, session_options=options).train()
        def run():
            module.lazy_reset_grad()  # reset inside the next run, not a kernel of its own
            return module(b.x, b.y, b.sample_weight, b.target_logits, b.logit_weight)
    t_open = time.monotonic()
    for _ in range(cfg["warmup"]):
        run()
    t_first = time.monotonic()
    wall_ms = []
    for _ in range(cfg["repeats"]):
        start = time.perf_counter()
        run()
        wall_ms.append(1000.0 * (time.perf_counter() - start))
    t_end = time.monotonic()
    if manifest.engine == "portable":
        session.end_profiling()
    else:
        del run, module  # ORT's session destructor writes the profile
        gc.collect()
    print("RESULT " + json.dumps({
        "t_python": t_python, "t_imports": t_imports, "t_open": t_open, "t_first": t_first, "t_end": t_end,
        "wall_ms": wall_ms, "onnxruntime": ort.__version__, "torch_imported": "torch" in sys.modules}))
""")


@dataclasses.dataclass(frozen=True)
class KernelsConfig:
    """What `measure_kernels` profiles.

    Args:
        model / input_shape / batch / threads / num_classes / artifacts / seed / runtime_python: as in
            `edgecl.bench.latency.LatencyConfig`.
        repeats: profiled steps per engine. warmup: steps run before them, left out of the figures.
        engines: names among KERNEL_ENGINES (None: both; with `artifacts`: the export's own engine).
    Raises:
        ValueError: naming the bad field and what is accepted (both fields of a contradiction).
        ArtifactError: `artifacts` is not a loadable export.
    """

    model: str | None = None
    input_shape: tuple | None = None
    batch: int = 32
    threads: int = 2
    repeats: int = 10
    warmup: int = 3
    engines: tuple | None = None
    seed: int = 0
    runtime_python: str | None = None
    num_classes: int | None = None
    artifacts: str | None = None

    def __post_init__(self):
        resolve_config_fields(self, KERNEL_ENGINES)
        engines = tuple(self.engines)
        if not engines or any(e not in KERNEL_ENGINES for e in engines) or len(set(engines)) != len(engines):
            raise ValueError(f"engines={list(engines)}; accepted: distinct names among {', '.join(KERNEL_ENGINES)} "
                             "(torch eager runs no ONNX Runtime session to profile)")
        check_seed_and_python(self.seed, self.runtime_python)
        for name, low in (("batch", 1), ("threads", 1), ("repeats", 1), ("warmup", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r}; accepted: an integer >= {low}")

    @property
    def subject(self) -> Subject:
        """What is measured (the resolved model, input, classes, or the artifact folder)."""
        return Subject.of(self.model, self.input_shape, self.num_classes, self.artifacts, self.engines)


@dataclasses.dataclass(frozen=True)
class OpKernels:
    """One op type as ORT ran it: share of the kernel time (%), ms per step, kernels per step (means)."""

    op_type: str
    share_pct: float
    ms_per_step: float
    kernels_per_step: float


@dataclasses.dataclass(frozen=True)
class EngineKernels:
    """One engine's profiled step.

    graph_file / file_nodes: the step graph and its node count as exported. kernels_per_step: kernels
    ORT executed in each profiled step (after its graph optimisations). kernel_ms_per_step: their summed
    time; run_ms_per_step: ORT's own time of the run (`model_run`); wall_ms_per_step: the run call timed
    around it in Python (the gap to the kernel time is framework overhead). All means over the repeats.
    ops: per op type, by share of the kernel time, largest first.
    """

    engine: str
    onnxruntime: str
    graph_file: str
    file_nodes: int
    kernels_per_step: tuple
    kernel_ms_per_step: float
    run_ms_per_step: float
    wall_ms_per_step: float
    torch_imported: bool
    ops: tuple


@dataclasses.dataclass(frozen=True)
class KernelsResult:
    """Result of `measure_kernels`: the conditions and one profile per engine."""

    model: str
    input_shape: tuple
    batch: int
    threads: int
    repeats: int
    warmup: int
    seed: int
    omp_wait_policy: str
    engines: tuple

    def to_dict(self) -> dict:
        """Plain JSON values (tuples as lists); `from_dict` gives this result back."""
        return {"kind": "kernels", **_plain(dataclasses.asdict(self))}

    @classmethod
    def from_dict(cls, d: dict) -> KernelsResult:
        """The result `to_dict` gave (e.g. read back from `bench kernels --json FILE`)."""
        engines = tuple(EngineKernels(**{**e, "kernels_per_step": tuple(e["kernels_per_step"]),
                                         "ops": tuple(OpKernels(**op) for op in e["ops"])}) for e in d["engines"])
        return cls(**{**{k: v for k, v in d.items() if k != "kind"}, "input_shape": tuple(d["input_shape"]),
                      "engines": engines})


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            return value, i


def _fields(data: bytes, start: int, end: int):
    """(field number, start, end of its value) of each protobuf field in data[start:end] (wire format)."""
    i = start
    while i < end:
        key, i = _varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            j = _varint(data, i)[1]
        elif wire == 2:
            size, i = _varint(data, i)
            j = i + size
        elif wire in (1, 5):
            j = i + (8 if wire == 1 else 4)
        else:  # 3, 4: groups, which ONNX never uses
            raise ValueError(f"wire type {wire} at byte {i}")
        if j > end:
            raise ValueError(f"field {field} runs past byte {end}")
        yield field, i, j
        i = j


def count_graph_nodes(path) -> int:
    """len(onnx.load(path).graph.node), read from the protobuf wire format without the onnx package.

    ModelProto field 7 is the graph, GraphProto field 1 a node (onnx.proto); nodes of subgraphs
    (If, Loop bodies) are not counted, as graph.node does not hold them.
    Raises:
        ArtifactError: the file is not an ONNX model (naming it).
    """
    from edgecl.runtime.errors import ArtifactError

    data = Path(path).read_bytes()
    try:
        graphs = [(i, j) for field, i, j in _fields(data, 0, len(data)) if field == 7]
        if not graphs:
            raise ValueError("no graph (field 7)")
        return sum(1 for i, j in graphs for field, _, _ in _fields(data, i, j) if field == 1)
    except (ValueError, IndexError) as e:
        raise ArtifactError(f"{str(path)!r} is not an ONNX model: {e}") from None


def parse_profile(events: list, warmup: int, repeats: int) -> list[dict[str, list[float]]]:
    """Per profiled run, op type -> the durations (us) of its kernels, from ORT's trace events.

    A run is a Session event `model_run` (ts, dur in us); its kernels are the Node events named
    `*_kernel_time` that start inside it. The first `warmup` runs are left out.
    Raises:
        RuntimeError: the profile does not hold warmup + repeats runs (ORT's profiler stops recording
            after 1,000,000 events: fewer repeats then).
    """
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(runs) != warmup + repeats:
        raise RuntimeError(f"ORT's profile holds {len(runs)} runs, {warmup + repeats} were made (warmup {warmup} + "
                           f"repeats {repeats}); ORT records at most 1,000,000 events: accepted: fewer repeats")
    starts = [start for start, _ in runs]
    per_run = [{} for _ in runs]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        k = bisect.bisect_right(starts, e["ts"]) - 1
        if k >= 0 and e["ts"] <= runs[k][1]:
            per_run[k].setdefault(e["args"]["op_name"], []).append(float(e["dur"]))
    return per_run[warmup:]


def summarize_runs(per_run: list[dict[str, list[float]]]) -> tuple[tuple[OpKernels, ...], tuple[int, ...], float]:
    """(per op type by share, kernels of each run, kernel ms per step) of the profiled runs."""
    totals: dict[str, list[float]] = {}
    for run in per_run:
        for op, durations in run.items():
            total = totals.setdefault(op, [0.0, 0])
            total[0] += sum(durations)
            total[1] += len(durations)
    n = len(per_run)
    all_us = sum(us for us, _ in totals.values()) or 1.0
    ops = tuple(sorted((OpKernels(op, 100.0 * us / all_us, us / 1000.0 / n, count / n)
                        for op, (us, count) in totals.items()), key=lambda o: (-o.share_pct, o.op_type)))
    counts = tuple(sum(len(d) for d in run.values()) for run in per_run)
    return ops, counts, sum(us for us, _ in totals.values()) / 1000.0 / n


def profile_engine(artifacts: Path, engine: str, batch_file: Path, config: KernelsConfig,
                   profile_dir: Path) -> EngineKernels:
    """Profile the training step of the export `artifacts` (for `engine`) in a fresh runtime-only process.

    Raises:
        RuntimeError: the child failed (its stderr tail), or its profile is incomplete.
    """
    profile_dir.mkdir(parents=True)
    cfg = {"artifacts": str(artifacts), "batch": str(batch_file), "threads": config.threads,
           "warmup": config.warmup, "repeats": config.repeats, "prefix": str(profile_dir / "profile")}
    report = run_child(_CHILD, cfg, config.runtime_python, what=f"runtime-only {engine} profiling")
    files = sorted(profile_dir.glob("profile*.json"))
    if len(files) != 1:
        raise RuntimeError(f"ORT wrote {len(files)} profile files for {engine} in {str(profile_dir)!r}; expected one")
    events = json.loads(files[0].read_text())
    per_run = parse_profile(events, config.warmup, config.repeats)
    ops, counts, kernel_ms = summarize_runs(per_run)
    run_durations = sorted((e["ts"], e["dur"]) for e in events if e.get("name") == "model_run")[config.warmup:]
    graph = STEP_GRAPHS[engine]
    return EngineKernels(engine, report["onnxruntime"], graph, count_graph_nodes(artifacts / graph), counts,
                         kernel_ms, sum(d for _, d in run_durations) / 1000.0 / config.repeats,
                         sum(report["wall_ms"]) / config.repeats, bool(report["torch_imported"]), ops)


def measure_kernels(config: KernelsConfig = KernelsConfig(), cache_dir=None) -> KernelsResult:
    """Export once (or take `config.artifacts` as they are), then profile each engine's training step.

    Exporting is host side (torch); `config.artifacts` needs no torch. Each engine is profiled in a
    fresh runtime-only process (`config.runtime_python`, default this interpreter).

    Args:
        config: what to profile. cache_dir: a folder to keep bench's exports in (see
            `edgecl.bench.fresh_process.prepare`); None: a temporary folder.
    Returns:
        KernelsResult: per engine, kernel time by op type, kernels per step, nodes in the file, and
        kernel time against the run's wall time.
    Raises:
        ValueError: a cache_dir with `config.artifacts`, or one that is an export
            (`edgecl.bench.subject.check_cache_dir`). RuntimeError: a child process failed.
    """
    cache_dir = check_cache_dir(cache_dir, config.subject)
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # libgomp reads it once, when torch loads it
    with tempfile.TemporaryDirectory(prefix="edgecl-kernels-") as tmp:
        prepared = prepare(config.subject, config.batch, config.engines, cache_dir or Path(tmp) / "exports",
                           config.seed)
        engines = tuple(profile_engine(Path(prepared.artifacts[e]), e, prepared.batch_file, config,
                                       Path(tmp) / f"profile-{e}") for e in config.engines)
    return KernelsResult(config.subject.label, tuple(config.input_shape), config.batch, config.threads,
                         config.repeats, config.warmup, config.seed, child_env()["OMP_WAIT_POLICY"], engines)


def check_top(top) -> int:
    """The number of op types a table shows before "other". Raises ValueError unless an integer >= 1."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top={top!r}; accepted: an integer >= 1")
    return top


def _count(kernels: float) -> str:
    return f"{kernels:.0f}" if float(kernels).is_integer() else f"{kernels:.1f}"


def format_table(result: KernelsResult, top: int = 12) -> str:
    """Markdown: per engine, a header with the totals, then the `top` op types by share and "other"."""
    top = check_top(top)
    lines = []
    for e in result.engines:
        kernels = sorted(set(e.kernels_per_step))
        overhead = e.wall_ms_per_step - e.kernel_ms_per_step
        lines += [f"{e.engine}: {result.model} {'x'.join(map(str, result.input_shape))}, batch {result.batch}, "
                  f"{result.threads} threads, onnxruntime {e.onnxruntime}, {result.repeats} steps profiled (after "
                  f"{result.warmup} warm-up), OMP_WAIT_POLICY={result.omp_wait_policy}",
                  "",
                  f"{e.graph_file}: {e.file_nodes} nodes in the file; {'/'.join(map(str, kernels))} kernels "
                  f"executed per step after ORT's graph optimisations",
                  f"kernel time {e.kernel_ms_per_step:.1f} ms per step of {e.wall_ms_per_step:.1f} ms wall "
                  f"({100 * e.kernel_ms_per_step / e.wall_ms_per_step:.1f} %; ORT's run {e.run_ms_per_step:.1f} ms); "
                  f"framework overhead {overhead:.1f} ms",
                  "",
                  "| op type | kernel time | ms per step | kernels per step |",
                  "|---|---:|---:|---:|"]
        shown, rest = e.ops[:top], e.ops[top:]
        lines += [f"| {o.op_type} | {o.share_pct:.1f} % | {o.ms_per_step:.2f} | {_count(o.kernels_per_step)} |"
                  for o in shown]
        if rest:
            lines.append(f"| other ({len(rest)} op types) | {sum(o.share_pct for o in rest):.1f} % | "
                         f"{sum(o.ms_per_step for o in rest):.2f} | {_count(sum(o.kernels_per_step for o in rest))} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


__all__ = ["KERNEL_ENGINES", "EngineKernels", "KernelsConfig", "KernelsResult", "OpKernels", "check_top",
           "count_graph_nodes", "format_table", "measure_kernels", "parse_profile"]
