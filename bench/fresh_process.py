"""Training in a fresh process: what `bench latency` (cold start) and `bench memory` measure.

The parent exports the model once (host side, torch) or takes the user's export as it is
(no torch), and writes one batch to disk; each measurement then starts a new Python
interpreter that trains from those files:

- a *runtime-only* process (`portable` or `ort-training` engine): it imports numpy and
  `edgecl.runtime` only, opens the artifacts and steps; it never imports torch, and
  reports whether `"torch" in sys.modules` at the end to prove it;
- a *torch-eager* process doing the same work: the same model (built-in family, or the
  user's FILE.py:FUNCTION) built from the same seed, the same batch, the same threads and
  optimizer (SGD), in plain eager torch.

The children use only the standard library until they import what they train with, so a
report separates the bare interpreter, the imports, opening the model and the steps.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import textwrap
from pathlib import Path

import numpy as np

from edgecl.runtime.probe import REPORT_SRC, STATUS_SRC, probe_runtime, run_child

from .subject import MODEL_NAMES, NUM_CLASSES, Subject, check_shape, parse_shape  # noqa: F401  (re-exported)

ENGINES = ("portable", "ort-training", "torch")
LEARNING_RATE = 0.03  # OptimizerConfig's default SGD, no momentum, in every engine

# argv[1]: JSON {batch, steps, threads, lr, models_py, model, function, input_shape, num_classes, seed}: a
# built-in family (function null: models_py is edgecl.exporters.models) or the user's FILE.py:FUNCTION
# (models_py is the file, its folder on sys.path as for `python FILE.py`); the runtime-only child is
# edgecl.runtime.probe's (the board agent runs it too).
_TORCH_CHILD = "import sys, time, json\n" + STATUS_SRC + textwrap.dedent("""
    cfg = json.loads(sys.argv[1])
    t_python = time.monotonic()
    rss_interpreter = _status("VmRSS")
    import importlib.util, os
    import numpy as np
    import torch
    # the model definitions only: edgecl's models.py (torch and nothing of edgecl's) or the user's file, with
    # its folder first on sys.path (as for `python FILE.py`) and no bytecode written there
    if cfg["function"] is not None:
        sys.path.insert(0, os.path.dirname(os.path.abspath(cfg["models_py"])))
        sys.dont_write_bytecode = True
    spec = importlib.util.spec_from_file_location("edgecl_models", cfg["models_py"])
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    t_imports = time.monotonic()
    rss_imports = _status("VmRSS")
    torch.set_num_threads(cfg["threads"])
    with np.load(cfg["batch"]) as z:
        x, y = torch.from_numpy(z["x"]), torch.from_numpy(z["y"])
    if cfg["function"] is None:
        model = models.build_model(cfg["model"], tuple(cfg["input_shape"]), cfg["num_classes"], seed=cfg["seed"])
    else:  # as edgecl.bench.subject.build_net calls it
        torch.manual_seed(cfg["seed"])
        model = getattr(models, cfg["function"])()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"])
    t_open = time.monotonic()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    losses = [step()]
    t_first = time.monotonic()
    losses += [step() for _ in range(cfg["steps"] - 1)]
    t_end = time.monotonic()
""")

@dataclasses.dataclass(frozen=True)
class ChildReport:
    """One fresh training process, timed from its spawn by the parent.

    Times in ms from the parent's spawn: `python_ms` (interpreter up, stdlib only),
    `imports_ms` (numpy + edgecl.runtime, or torch), `open_ms` (model opened or built),
    `first_step_ms` (first training step finished: the cold start). Memory in bytes
    (None where the OS does not say): resident set of the bare interpreter, after the
    imports, and the peak (VmHWM / ru_maxrss) at the end of the run.
    """

    engine: str
    process: str  # "runtime-only" or "torch-eager"
    steps: int
    python_ms: float
    imports_ms: float
    open_ms: float
    first_step_ms: float
    end_ms: float
    interpreter_rss_bytes: int | None
    imports_rss_bytes: int | None
    peak_rss_bytes: int
    torch_imported: bool
    losses: tuple

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine {self.engine!r} is unknown; accepted: {', '.join(ENGINES)}")
        if self.steps < 1 or len(self.losses) != self.steps:
            raise ValueError(f"steps={self.steps} with {len(self.losses)} losses; accepted: steps >= 1, one loss each")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What the children train from: one artifact folder per ONNX engine and one batch file.

    `torch_model` is the exported nn.Module (None for the user's artifact folder: no torch there).
    """

    subject: Subject
    batch: int
    seed: int
    artifacts: dict  # engine -> Path (ONNX engines only)
    batch_file: Path
    torch_model: object = dataclasses.field(repr=False, compare=False)

    @property
    def model(self) -> str:
        return self.subject.label

    @property
    def input_shape(self) -> tuple:
        return self.subject.input_shape

    def layers(self) -> list[dict]:
        """The layer table (FLOPs, the roofline): from an export's manifest, else from the torch model."""
        if self.artifacts:
            from edgecl.runtime.manifest import load_manifest

            return load_manifest(next(iter(self.artifacts.values())), verify=False).extra["layers"]
        import torch

        from edgecl.exporters.layers import layer_table

        return layer_table(self.torch_model, torch.zeros(2, *self.input_shape))


def check_seed_and_python(seed, runtime_python) -> None:
    """The seed of a measurement (an int RunConfig accepts) and the interpreter of its runtime-only children.

    Raises:
        ValueError: a seed outside [0, 2**64 - 1], or a runtime_python that is not an executable file.
    """
    from edgecl.runtime.loop import MAX_SEED

    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed!r}; accepted: an integer >= 0 and <= 2**64 - 1")
    if runtime_python is not None and not (os.path.isfile(runtime_python) and os.access(runtime_python, os.X_OK)):
        raise ValueError(f"runtime_python={runtime_python!r} is not an executable file; accepted: the path of a "
                         "Python interpreter, e.g. .venv-stock-ort/bin/python")


def check_engines(engines) -> tuple[str, ...]:
    """A non-empty tuple of distinct engine names from ENGINES.

    Raises:
        ValueError: an unknown or repeated name, or none at all.
    """
    engines = tuple(engines)
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines or len(set(engines)) != len(engines):
        raise ValueError(f"engines={list(engines)}; accepted: distinct names among {', '.join(ENGINES)}")
    return engines


def _write_batch(folder: Path, subject: Subject, batch: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    batch_file = folder / f"batch{batch}.npz"
    np.savez(batch_file, x=rng.standard_normal((batch, *subject.input_shape), dtype=np.float32),
             y=rng.integers(0, subject.num_classes, batch).astype(np.int64))
    return batch_file


def prepare(subject: Subject, batch: int, engines, cache_dir, seed: int = 0) -> Prepared:
    """The artifacts of each ONNX engine in `engines`, and one batch file.

    A built-in family or model file (host side, torch) is exported into
    `cache_dir/<name>-<shape>-seed<seed>-<key>/<engine>`, keyed on the model, its input, classes,
    seed and the exporter (`edgecl.bench.subject.cache_key`), and reused when a previous call left
    it there (its manifest loads and every file's sha256 matches). The user's artifact folder
    (`subject.artifacts`) is used as it is, read only, without torch; then only the batch file is
    written, into `cache_dir`.

    Args:
        subject: what to measure (`edgecl.bench.subject.resolve_subject`). batch: samples per step.
        engines: names in ENGINES (an artifact folder: its own engine only). cache_dir: where to
            write (created); a persistent folder keeps the exports for the next call.
        seed: initial weights (the model's) and the batch.
    Returns:
        Prepared: artifact folders, the batch file (x float32 (batch, *input_shape), y int64) and the model.
    Raises:
        ValueError: bad batch or engines, an export's engine that is not asked for.
    """
    engines = check_engines(engines)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r}; accepted: an integer >= 1")
    cache_dir = Path(cache_dir)
    if subject.artifacts is not None:
        if engines != (subject.engine,):
            raise ValueError(f"engines={list(engines)} with artifacts={str(subject.artifacts)!r}; accepted: "
                             f"[{subject.engine!r}], its own engine")
        cache_dir.mkdir(parents=True, exist_ok=True)
        return Prepared(subject, batch, seed, {subject.engine: subject.artifacts},
                        _write_batch(cache_dir, subject, batch, seed), None)
    import torch

    from edgecl.exporters import export
    from edgecl.runtime import ArtifactError, load_manifest
    from edgecl.runtime.locks import folder_lock

    from .subject import build_net, cache_name

    net = build_net(subject, seed)
    folder = cache_dir / cache_name(subject, net, seed)
    folder.parent.mkdir(parents=True, exist_ok=True)
    artifacts = {}
    # two bench commands on one cache: the second waits for the first's export, then reuses it
    with folder_lock(folder, wait=True, what="bench cache folder"):
        folder.mkdir(exist_ok=True)
        for engine in engines:
            if engine == "torch":
                continue
            try:
                kept = load_manifest(folder / engine)
                if kept.engine != engine or tuple(kept.input_shape) != subject.input_shape:
                    raise ArtifactError("another export")
                artifacts[engine] = folder / engine
            except ArtifactError:
                artifacts[engine] = export(net, torch.zeros(2, *subject.input_shape), folder / engine,
                                           engine=engine).folder
        batch_file = _write_batch(folder, subject, batch, seed)
    return Prepared(subject, batch, seed, artifacts, batch_file, net)


def run_fresh(prepared: Prepared, engine: str, steps: int, threads: int, python: str | None = None,
              timeout_s: float = 600.0) -> ChildReport:
    """Train `steps` SGD steps on the prepared batch in a new interpreter and report time and memory.

    Args:
        engine: "portable" / "ort-training" (runtime-only process) or "torch" (torch-eager process).
        python: interpreter of runtime-only children (default: this one); torch children always
            use this one. A runtime-only venv (numpy + stock onnxruntime + edgecl) measures what a
            board installs.
    Raises:
        ValueError: bad engine, steps or threads. RuntimeError: the child failed (its stderr tail).
    """
    check_engines([engine])
    if steps < 1 or threads < 1:
        raise ValueError(f"steps={steps}, threads={threads}; accepted: both >= 1")
    if engine == "torch":
        subject = prepared.subject
        if prepared.torch_model is None:
            raise ValueError(f"engine 'torch' with artifacts={str(subject.artifacts)!r}: an export holds no torch "
                             f"model; accepted: {', '.join(prepared.artifacts)}")
        if subject.model_file is None:
            import edgecl.exporters.models as models

            models_py, function = models.__file__, None
        else:
            models_py, function = str(subject.model_file[0].resolve()), subject.model_file[1]
        cfg = {"batch": str(prepared.batch_file), "steps": steps, "threads": threads, "lr": LEARNING_RATE,
               "models_py": models_py, "model": subject.model, "function": function,
               "input_shape": list(subject.input_shape), "num_classes": subject.num_classes, "seed": prepared.seed}
        r, process = run_child(_TORCH_CHILD + REPORT_SRC, cfg, None, timeout_s, "torch"), "torch-eager"
    else:
        if engine not in prepared.artifacts:
            raise ValueError(f"engine {engine!r} was not prepared; prepared: {', '.join(prepared.artifacts)}")
        r = probe_runtime(prepared.artifacts[engine], prepared.batch_file, steps, threads, LEARNING_RATE, python,
                          timeout_s, engine)
        process = "runtime-only"
    return ChildReport(engine, process, steps, r["t_python"], r["t_imports"], r["t_open"], r["t_first"], r["t_end"],
                       r["rss_interpreter"], r["rss_imports"], int(r["rss_peak"]), bool(r["torch_imported"]),
                       tuple(r["losses"]))


def rows_csv(rows, fields) -> str:
    """Result rows (dataclasses) as CSV with header `fields`: what `bench latency` and `bench memory --csv` print."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(dataclasses.asdict(r))
    return out.getvalue()
