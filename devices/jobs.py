"""What the agent runs on the board: training, evaluation and step-latency jobs as typed specs.

A job names artifacts and data already on the board (pushed by the host, or a data set path
on the board) and builds the same learner as `edgecl run` does on the host (strategy, replay
buffer sized by count or by a memory budget), then calls `edgecl.runtime.loop.run_scenario`.
Imports only the runtime: numpy and onnxruntime, never torch.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from edgecl.runtime.data import Dataset, load_dataset
from edgecl.runtime.errors import CheckpointFormatError, ConfigMismatchError
from edgecl.runtime.files import write_atomic
from edgecl.runtime.job import LearnerSpec, build_learner
from edgecl.runtime.loop import RunConfig, RunResult, run_scenario
from edgecl.runtime.metrics import class_il_accuracy, task_il_accuracy
from edgecl.runtime.optim import OptimizerConfig
from edgecl.runtime.resume import check_resume
from edgecl.runtime.scenarios import Scenario, permuted_scenario, split_scenario, train_test_split
from edgecl.runtime.strategies import Learner

SPLIT_FILE = "split.npz"  # what a pushed data folder holds: x_train, y_train, x_test, y_test, num_classes, name
SCENARIOS = ("split", "permuted")
OFFICIAL_TEST = ("fashion-mnist", "cifar10")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def check_job_name(what: str, value) -> str:
    """A run, artifact or data name that stays inside the workdir. Raises ValueError otherwise."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"{what}={value!r}; accepted: 1-128 letters, digits, '_', '.', '-', not starting with '.'")
    return value


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where a job's data comes from and how it is cut into tasks.

    Args:
        data: name of a data folder pushed to the board (holding SPLIT_FILE), or None.
        board_path: a data set spec on the board (see edgecl.runtime.data.load_dataset, e.g.
            "npz:/data/x.npz", "fashion-mnist:/usr/share/datasets/fashion-mnist"), or None.
            Exactly one of data and board_path.
        scenario: "split" (tasks of `classes_per_task` classes in order) or "permuted".
        tasks: how many tasks to train (Split Digits with tasks=2: classes 0-1, then 2-3).
        classes_per_task: classes per task of a split scenario.
        seed: seeds the 80/20 split of data without an official test split, and permutations.
    """

    data: str | None = None
    board_path: str | None = None
    scenario: str = "split"
    tasks: int = 5
    classes_per_task: int = 2
    seed: int = 0

    def __post_init__(self):
        if (self.data is None) == (self.board_path is None):
            raise ValueError(f"data={self.data!r}, board_path={self.board_path!r}; accepted: exactly one of them")
        if self.data is not None:
            check_job_name("data", self.data)
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario={self.scenario!r}; accepted: {', '.join(SCENARIOS)}")
        for name in ("tasks", "classes_per_task"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; accepted: an integer >= 1")
        RunConfig(seed=self.seed)  # the same seeds as a run's


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSpec(LearnerSpec):
    """A training run on the board: the learner of `edgecl run` (LearnerSpec: strategy, buffer,
    budget, schedule) plus where it runs.

    Args:
        run: run id; its checkpoints live under workdir/runs/<run>/ and a new train of the
            same run id resumes from them. artifact: name of pushed artifacts.
        data: see DataSpec (a dict is accepted, as it arrives over the link).
        lr: SGD step, 0.1 by default (Split Digits, the data a board is first tried on).
    """

    run: str
    artifact: str
    data: DataSpec
    lr: float = 0.1

    def __post_init__(self):
        if isinstance(self.data, dict):
            object.__setattr__(self, "data", DataSpec(**self.data))
        if not isinstance(self.data, DataSpec):
            raise ValueError(f"data={self.data!r}; accepted: a DataSpec or its dict")
        check_job_name("run", self.run)
        check_job_name("artifact", self.artifact)
        super().__post_init__()


def load_split(folder: str | Path) -> tuple[Dataset, Dataset]:
    """The train and test data sets of a pushed data folder (SPLIT_FILE)."""
    with np.load(Path(folder) / SPLIT_FILE, allow_pickle=False) as z:
        k, name = int(z["num_classes"]), str(z["name"])
        return (Dataset(f"{name}-train", z["x_train"], z["y_train"], k),
                Dataset(f"{name}-test", z["x_test"], z["y_test"], k))


def save_split(train: Dataset, test: Dataset, folder: str | Path, name: str) -> Path:
    """Write train and test as one compressed SPLIT_FILE (what the host pushes). Returns the file."""
    path = Path(folder) / SPLIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x_train=train.x, y_train=train.y, x_test=test.x, y_test=test.y,
             num_classes=np.int64(train.num_classes), name=np.array(name))
    return path


def build_scenario(spec: DataSpec, workdir: Path) -> Scenario:
    """The scenario a job trains on, from pushed data or a data set on the board."""
    if spec.data is not None:
        folder = workdir / "data" / spec.data
        if not (folder / SPLIT_FILE).is_file():
            raise FileNotFoundError(f"no data {spec.data!r} on the board (push it first); have: "
                                    f"{sorted(p.name for p in (workdir / 'data').glob('*')) or 'none'}")
        train, test = load_split(folder)
    else:
        train = load_dataset(spec.board_path, "train")
        if spec.board_path.partition(":")[0] in OFFICIAL_TEST:
            test = load_dataset(spec.board_path, "test")
        else:
            train, test = train_test_split(train, 0.2, spec.seed)
    if spec.scenario == "permuted":
        return permuted_scenario(train, test, spec.tasks, seed=spec.seed)
    return split_scenario(train, test, spec.tasks, classes_per_task=spec.classes_per_task)


class _ReportingLearner(Learner):
    """A Learner that calls `on_step(step, loss)` after every step (progress over the link)."""

    on_step = None

    def observe(self, x, y, indices):
        loss = super().observe(x, y, indices)
        if self.on_step is not None:
            self.on_step(self.step, loss)
        return loss


def open_board_engine(workdir: Path, artifact: str, lr: float, threads: int | None):
    from edgecl.runtime.open import open_engine

    folder = workdir / "artifacts" / check_job_name("artifact", artifact)
    if not folder.is_dir():
        raise FileNotFoundError(f"no artifact {artifact!r} on the board (push it first); have: "
                                f"{sorted(p.name for p in (workdir / 'artifacts').glob('*')) or 'none'}")
    return open_engine(folder, OptimizerConfig("sgd", lr=lr), threads=threads)


def run_dir(workdir: Path, run: str) -> Path:
    return workdir / "runs" / check_job_name("run", run)


def train(spec: TrainSpec, workdir: Path, on_step=None, restart: bool = False) -> RunResult:
    """Train on the board; resume from workdir/runs/<run>/checkpoints if the same spec ran before.

    The checkpoints record the spec (as `edgecl run`'s do its JobConfig, `edgecl.runtime.resume`):
    a train of the run id under another spec is refused before data or artifacts are loaded.

    Raises:
        FileNotFoundError: artifact or data not on the board. ConfigMismatchError (a ValueError):
            the run id has checkpoints of another spec, naming each field that differs (pass
            restart=True to start over). CheckpointFormatError: checkpoints of an earlier edgecl
            (restart). ValueError: a bad spec or budget, or a buffer or budget larger than this
            board's memory. Nothing is written on the board when any of these is raised.
    """
    import shutil

    folder = run_dir(workdir, spec.run)
    try:
        if not restart:
            check_resume(folder / "checkpoints", spec.to_dict())
        scenario = build_scenario(spec.data, workdir)
        engine = open_board_engine(workdir, spec.artifact, spec.lr, spec.threads)
        # before anything is written: build_learner refuses a buffer or budget this board's memory cannot hold
        learner, plan, _ = build_learner(engine, scenario, spec, _ReportingLearner)
        learner.on_step = on_step
        if restart:
            shutil.rmtree(folder, ignore_errors=True)
        extra = {"job": spec.to_dict(), "label": spec.strategy().label, "budget_plan": plan,
                 "device": {"machine": platform.machine(), "python": platform.python_version()}}
        result = run_scenario(scenario, learner, spec.run_config(),
                              folder / "checkpoints", progress=False, extra_config=extra)
    except ConfigMismatchError as e:
        raise ConfigMismatchError(f"run {spec.run!r} exists on the board with another spec: "
                                  f"{'; '.join(e.differences)}; accepted: the same spec (resumes) or restart",
                                  e.differences) from e
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"run {spec.run!r}: {e}; on the board: train it with restart") from e
    write_atomic(folder / "result.json", json.dumps(result.to_dict()))
    return result


def evaluate(artifact: str, data: DataSpec, workdir: Path, run: str | None = None, threads: int | None = 2) -> dict:
    """Class-IL and task-IL accuracy per task of the artifact's weights, or of a run's latest checkpoint.

    Returns:
        {"class_il": [per task], "task_il": [per task], "source": "artifact" or the checkpoint folder}.
    """
    from edgecl.runtime.checkpoint import load_checkpoint

    scenario = build_scenario(data, workdir)
    engine = open_board_engine(workdir, artifact, 0.1, threads)
    source = "artifact"
    if run is not None:
        ckpt = load_checkpoint(run_dir(workdir, run) / "checkpoints", fallback=True)
        if ckpt is None:
            raise FileNotFoundError(f"run {run!r} has no checkpoint on the board")
        engine.load_state_arrays(ckpt.parts["engine"], f"checkpoint {ckpt.path}")
        source = ckpt.path.name
    class_il, task_il = [], []
    for task in scenario.tasks:
        logits = engine.evaluate(task.x_test)
        class_il.append(class_il_accuracy(logits, task.y_test))
        task_il.append(task_il_accuracy(logits, task.y_test, list(task.classes)))
    return {"class_il": class_il, "task_il": task_il, "source": source}


def bench_steps(artifact: str, workdir: Path, batch: int = 32, steps: int = 30, warmup: int = 3,
                threads: int | None = 2, seed: int = 0) -> dict:
    """Median and IQR (ms) of `steps` training steps, then of `steps` inference calls, on the board.

    Inputs are random (seeded); every call is timed alone with time.perf_counter.

    Returns:
        {"median_ms", "iqr_ms" (training step), "infer_median_ms", "infer_iqr_ms", "steps", "batch",
        "threads", "engine", "model", "machine", "measured": True}.
    """
    if steps < 3 or batch < 2 or warmup < 0:
        raise ValueError(f"steps={steps}, batch={batch}, warmup={warmup}; accepted: steps >= 3, batch >= 2, "
                         "warmup >= 0")
    engine = open_board_engine(workdir, artifact, 0.01, threads)
    rng = np.random.default_rng(seed)
    x = rng.random((batch, *engine.manifest.input_shape), dtype=np.float32)
    y = rng.integers(0, engine.manifest.num_classes, batch)
    timed = {}
    for phase, call in (("step", lambda: engine.step(x, y)), ("infer", lambda: engine.evaluate(x))):
        for _ in range(warmup):
            call()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            call()
            times.append(1000 * (time.perf_counter() - t0))
        q75, q25 = np.percentile(times, [75, 25])
        timed[phase] = (statistics.median(times), float(q75 - q25))
    return {"median_ms": timed["step"][0], "iqr_ms": timed["step"][1], "infer_median_ms": timed["infer"][0],
            "infer_iqr_ms": timed["infer"][1], "steps": steps, "batch": batch, "threads": threads,
            "engine": engine.name, "model": engine.manifest.model_name, "machine": platform.machine(),
            "measured": True}


def probe_fresh_process(artifact: str, workdir: Path, batch: int = 32, steps: int = 20, threads: int | None = 2,
                        seed: int = 0) -> dict:
    """Peak resident memory and cold start of a fresh runtime-only process training `artifact` on the board.

    A new interpreter (this one's) imports numpy and edgecl.runtime, opens the artifact and
    trains `steps` steps on a seeded random batch (edgecl.runtime.probe, as `bench memory` on
    the host), so the agent's own memory (its link, earlier jobs) is not counted.

    Returns:
        {"peak_rss_bytes", "imports_rss_bytes", "interpreter_rss_bytes", "first_step_ms" (from
        the spawn: the cold start), "torch_imported", "steps", "batch", "threads", "engine",
        "model", "machine", "measured": True}.
    """
    from edgecl.runtime.manifest import load_manifest
    from edgecl.runtime.probe import probe_runtime

    if steps < 1 or batch < 2:
        raise ValueError(f"steps={steps}, batch={batch}; accepted: steps >= 1, batch >= 2")
    folder = workdir / "artifacts" / check_job_name("artifact", artifact)
    if not folder.is_dir():
        raise FileNotFoundError(f"no artifact {artifact!r} on the board (push it first); have: "
                                f"{sorted(p.name for p in (workdir / 'artifacts').glob('*')) or 'none'}")
    manifest = load_manifest(folder)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="edgecl-probe-") as tmp:  # the batch the child reads, then gone
        batch_file = Path(tmp) / "batch.npz"
        np.savez(batch_file, x=rng.standard_normal((batch, *manifest.input_shape), dtype=np.float32),
                 y=rng.integers(0, manifest.num_classes, batch).astype(np.int64))
        r = probe_runtime(folder, batch_file, steps, threads)
    return {"peak_rss_bytes": int(r["rss_peak"]), "imports_rss_bytes": r["rss_imports"],
            "interpreter_rss_bytes": r["rss_interpreter"], "first_step_ms": r["t_first"],
            "torch_imported": bool(r["torch_imported"]), "steps": steps, "batch": batch, "threads": threads,
            "engine": manifest.engine, "model": manifest.model_name, "machine": platform.machine(),
            "measured": True}
