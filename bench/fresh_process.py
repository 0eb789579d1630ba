"""Training in a fresh process: what `bench latency` (cold start) and `bench memory` measure.

The parent (the host, torch available) exports the model once and writes one batch to
disk; each measurement then starts a new Python interpreter that trains from those files:

- a *runtime-only* process (`portable` or `ort-training` engine): it imports numpy and
  `edgecl.runtime` only, opens the artifacts and steps; it never imports torch, and
  reports whether `"torch" in sys.modules` at the end to prove it;
- a *torch-eager* process doing the same work: the same model family built from the same
  seed, the same batch, the same threads and optimizer (SGD), in plain eager torch.

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

ENGINES = ("portable", "ort-training", "torch")
MODEL_NAMES = ("mlp", "cnn", "cnn-s2", "resnet", "mobilenet")  # edgecl.exporters.models.MODELS (checked by a test)
NUM_CLASSES = 10
LEARNING_RATE = 0.03  # OptimizerConfig's default SGD, no momentum, in every engine

# argv[1]: JSON {batch, steps, threads, lr, models_py, model, input_shape, num_classes, seed}; the
# runtime-only child is edgecl.runtime.probe's (the board agent runs it too).
_TORCH_CHILD = "import sys, time, json\n" + STATUS_SRC + textwrap.dedent("""
    cfg = json.loads(sys.argv[1])
    t_python = time.monotonic()
    rss_interpreter = _status("VmRSS")
    import importlib.util
    import numpy as np
    import torch
    # the model definitions only (the file imports torch and nothing of edgecl's)
    spec = importlib.util.spec_from_file_location("edgecl_models", cfg["models_py"])
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    t_imports = time.monotonic()
    rss_imports = _status("VmRSS")
    torch.set_num_threads(cfg["threads"])
    with np.load(cfg["batch"]) as z:
        x, y = torch.from_numpy(z["x"]), torch.from_numpy(z["y"])
    model = models.build_model(cfg["model"], tuple(cfg["input_shape"]), cfg["num_classes"], seed=cfg["seed"]).train()
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
    """What the children train from: one artifact folder per ONNX engine and one batch file."""

    model: str
    input_shape: tuple
    batch: int
    seed: int
    artifacts: dict  # engine -> Path (ONNX engines only)
    batch_file: Path
    torch_model: object = dataclasses.field(repr=False, compare=False)  # the exported nn.Module


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


def check_shape(model: str, input_shape) -> tuple[int, ...]:
    """The shape of one sample as a tuple of positive ints; (C, H, W) with H, W >= 4 for conv nets.

    Raises:
        ValueError: an unknown model, or a shape the model cannot take.
    """
    if model not in MODEL_NAMES:
        raise ValueError(f"model {model!r} is unknown; accepted: {', '.join(MODEL_NAMES)}")
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape={input_shape!r}; accepted: a sequence of positive integers") from None
    if not shape or any(d < 1 for d in shape) or shape != tuple(input_shape):
        raise ValueError(f"input_shape={input_shape!r}; accepted: a sequence of positive integers")
    if model != "mlp" and (len(shape) != 3 or min(shape[1:]) < 4):
        raise ValueError(f"input_shape={shape} for {model!r}; accepted: (C, H, W) with H, W >= 4")
    return shape


def parse_shape(text: str) -> tuple[int, ...]:
    """'1x8x8' -> (1, 8, 8).

    Raises:
        ValueError: not positive integers joined by 'x'.
    """
    try:
        shape = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--input-shape {text!r}; accepted: positive integers joined by 'x', e.g. 1x8x8") from None
    if any(d < 1 for d in shape):
        raise ValueError(f"--input-shape {text!r}; accepted: positive integers joined by 'x', e.g. 1x8x8")
    return shape


def prepare(model: str, input_shape, batch: int, engines, folder, seed: int = 0) -> Prepared:
    """Export `model` for each ONNX engine in `engines` and write one batch (host side, torch).

    Exports are kept in `folder/<model>-<shape>-seed<seed>/<engine>` and reused when a
    previous call left them there (their manifest loads and every file's sha256 matches):
    pass a persistent folder to measure again without exporting again, a temporary one
    otherwise (an export from an older edgecl would be reused as it is).

    Args:
        model: a name in MODEL_NAMES. input_shape: one sample, e.g. (1, 8, 8).
        batch: samples per step. engines: names in ENGINES. folder: where to write (created).
        seed: initial weights (build_model's seed) and the batch.
    Returns:
        Prepared: artifact folders, the batch file (x float32 (batch, *input_shape), y int64) and the model.
    """
    import torch

    from edgecl.exporters import build_model, export
    from edgecl.runtime import ArtifactError, load_manifest

    shape = check_shape(model, input_shape)
    engines = check_engines(engines)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r}; accepted: an integer >= 1")
    folder = Path(folder) / f"{model}-{'x'.join(map(str, shape))}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    net = build_model(model, shape, NUM_CLASSES, seed=seed)
    artifacts = {}
    for engine in engines:
        if engine == "torch":
            continue
        try:
            kept = load_manifest(folder / engine)
            if kept.engine != engine or tuple(kept.input_shape) != shape:
                raise ArtifactError("another export")
            artifacts[engine] = folder / engine
        except ArtifactError:
            artifacts[engine] = export(net, torch.zeros(2, *shape), folder / engine, engine=engine).folder
    rng = np.random.default_rng(seed)
    batch_file = folder / f"batch{batch}.npz"
    np.savez(batch_file, x=rng.standard_normal((batch, *shape), dtype=np.float32),
             y=rng.integers(0, NUM_CLASSES, batch).astype(np.int64))
    return Prepared(model, shape, batch, seed, artifacts, batch_file, net)


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
        import edgecl.exporters.models as models

        cfg = {"batch": str(prepared.batch_file), "steps": steps, "threads": threads, "lr": LEARNING_RATE,
               "models_py": models.__file__, "model": prepared.model, "input_shape": list(prepared.input_shape),
               "num_classes": NUM_CLASSES, "seed": prepared.seed}
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
