"""`edgecl run`: one continual-learning run end to end (export on the host, train with an engine).

The training itself is `edgecl.runtime.loop.run_scenario`, which imports no torch; this
module adds what the host does around it: pick the data, export (cached), plan memory,
print a table, write JSON and a plot. The host process exports (torch); the training runs
in a fresh runtime-only process (`edgecl.bench.cl_process`), so the run's peak RSS is that
of the training alone, as on a device. The torch engine trains in the host process.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

from edgecl.bench.export_cache import export_cached
from edgecl.bench.fresh_process import MODEL_NAMES
from edgecl.runtime.budget import peak_rss_bytes
from edgecl.runtime.checkpoint import CheckpointWriter
from edgecl.runtime.data import Dataset, load_digits, load_fashion_mnist
from edgecl.runtime.job import LearnerSpec, build_learner, check_memory
from edgecl.runtime.loop import RunResult, run_scenario
from edgecl.runtime.resume import check_resume
from edgecl.runtime.scenarios import (Scenario, digits_scenario, fashion_mnist_scenario, padded_scenario,
                                      permuted_scenario, subset_scenario, train_test_split)

DATASETS = ("digits", "fashion-mnist")
# Digits has ~290 training examples a task (9 batches an epoch): more epochs and a larger step.
DATA_DEFAULTS = {"digits": {"epochs": 20, "lr": 0.1}, "fashion-mnist": {"epochs": 5, "lr": 0.03}}
ENGINES = ("portable", "ort-training", "torch")
WIDTH_MODELS = ("cnn", "cnn-s2", "resnet", "resnet18", "mobilenet")  # the families with a `width` argument


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobConfig(LearnerSpec):
    """Everything `edgecl run` takes: the learner (LearnerSpec: strategy, buffer, budget, schedule)
    plus data, scenario, model and engine. Defaults: SparCL-DER++ 0.75 on Split Digits, portable."""

    data: str = "digits"
    scenario: str = "split"
    model: str = "cnn"
    engine: str = "portable"
    nudge_ulp: bool = False  # a diagnostic: one stem weight moved by one ulp before training (see bench drift)
    width: int | None = None  # the model family's width (None: its default), e.g. a narrower dense baseline
    pad_to: int | None = None  # images zero-padded to pad_to x pad_to (28x28 Fashion-MNIST to ResNet-18's 32x32)
    train_per_task: int | None = None  # a shorter run: at most this many training examples a task (None: all)
    test_per_task: int | None = None  # and test examples a task
    # latent replay: the split point (edgecl.exporters.latent.split_points), and the task (1-based) after
    # which the prefix freezes; until then the whole model trains
    latent_split: str | None = None
    freeze_after: int = 1

    def __post_init__(self):
        if self.data not in DATASETS:
            raise ValueError(f"data={self.data!r}; accepted: {', '.join(DATASETS)}")
        if self.scenario not in ("split", "permuted"):
            raise ValueError(f"scenario={self.scenario!r}; accepted: split, permuted")
        if self.engine not in ENGINES:
            raise ValueError(f"engine={self.engine!r}; accepted: {', '.join(ENGINES)}")
        if self.model not in MODEL_NAMES:
            raise ValueError(f"model={self.model!r}; accepted: {', '.join(MODEL_NAMES)}")
        if self.width is not None and (isinstance(self.width, bool) or not isinstance(self.width, int)
                                       or self.width < 1):
            raise ValueError(f"width={self.width!r}; accepted: an integer >= 1, or None (the model's default)")
        if self.width is not None and self.model not in WIDTH_MODELS:
            raise ValueError(f"width={self.width} with model={self.model!r}; accepted: a width with one of "
                             f"{', '.join(WIDTH_MODELS)}")
        if self.structure == "channel" and self.engine != "portable":
            raise ValueError(f"structure='channel' with engine={self.engine!r}; accepted: engine='portable' (the "
                             "channel-structured step graph is a portable one)")
        for name in ("pad_to", "train_per_task", "test_per_task"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r}; accepted: an integer >= 1, or None")
        if isinstance(self.freeze_after, bool) or not isinstance(self.freeze_after, int) or self.freeze_after < 1:
            raise ValueError(f"freeze_after={self.freeze_after!r}; accepted: an integer >= 1 (the task after which "
                             "the prefix freezes)")
        if self.latent_split is not None and (self.engine != "portable" or self.sparsity is not None):
            raise ValueError(f"latent_split={self.latent_split!r} with engine={self.engine!r}, sparsity="
                             f"{self.sparsity!r}; accepted: latent replay with engine='portable' and a dense strategy "
                             "(--dense)")
        if not isinstance(self.nudge_ulp, bool):
            raise ValueError(f"nudge_ulp={self.nudge_ulp!r}; accepted: True or False")
        super().__post_init__()


def load_scenario(name: str, seed: int = 0, scenario: str = "split", digits: Dataset | None = None) -> Scenario:
    """Split (class- and task-incremental) or permuted (domain-incremental, 5 tasks) digits / Fashion-MNIST.

    Args:
        digits: the digits data set when it is already loaded (default: `load_digits()`, which
            imports scikit-learn); the training process gets them from the host this way.
    """
    if scenario == "split":
        return digits_scenario(seed, digits=digits) if name == "digits" else fashion_mnist_scenario()
    if name == "digits":
        train, test = train_test_split(load_digits() if digits is None else digits, 0.2, seed)
    else:
        train, test = load_fashion_mnist(split="train"), load_fashion_mnist(split="test")
    return permuted_scenario(train, test, n_tasks=5, seed=seed)


def job_scenario(job: JobConfig, digits: Dataset | None = None) -> Scenario:
    """The scenario `job` trains on: its data and scenario, padded and cut to a subset as it asks."""
    scenario = load_scenario(job.data, job.seed, job.scenario, digits)
    if job.pad_to is not None:
        scenario = padded_scenario(scenario, job.pad_to)
    if job.train_per_task is not None or job.test_per_task is not None:
        scenario = subset_scenario(scenario, job.train_per_task, job.test_per_task, job.seed)
    return scenario


def _export_cached(job: JobConfig, scenario: Scenario, out_dir: Path, split: str | None = None) -> tuple[object, Path]:
    engine = "portable" if job.engine == "torch" else job.engine
    structure = "channel" if job.structure == "channel" else None
    return export_cached(job.model, scenario.input_shape, scenario.num_classes, job.seed, out_dir, engine,
                         width=job.width, structure=structure, split=split)


def nudge_one_ulp(engine) -> str:
    """Move the largest-magnitude entry of the engine's first parameter up by one ulp; returns its name.

    What `JobConfig(nudge_ulp=True)` does before training: the float32 floor of `bench drift`.
    """
    name = next(iter(engine.param_shapes))
    w = engine.parameters()[name]
    i = np.unravel_index(int(np.argmax(np.abs(w))), w.shape)
    w[i] = np.nextafter(w[i], np.float32(np.inf))
    engine.set_parameters({name: w})
    return name


def run_job(job: JobConfig, out_dir="out", checkpoint_dir=None, progress: bool = True, isolate: bool = True):
    """Export (cached), plan memory, build the strategy and run it.

    Args:
        isolate: train in a fresh runtime-only process (`edgecl.bench.cl_process`: no torch, so
            the result's peak RSS is the training's own); False trains in this process. The torch
            engine always trains in this process. Either way the metrics are the same.
    Returns:
        (RunResult, the plan as a dict, the MemoryPlan or None when no budget was given). The
        result's config["process"] says where it trained: "training" ("runtime-only" or "host"),
        "pid", "torch_loaded" there, and "host_pid", "host_peak_rss_bytes" (this process's).
    Raises:
        ConfigMismatchError: `checkpoint_dir` holds a checkpoint of another job (each differing
            field named), found before any data is loaded or anything exported.
        FolderBusyError: another process writes into `checkpoint_dir`; also found before any work.
        TrainingProcessError: the training process failed (its exit code and the tail of its
            stderr); the checkpoints it wrote stay and resume.
    """
    if checkpoint_dir is None:
        return _run_job(job, out_dir, None, progress, isolate)
    with CheckpointWriter(checkpoint_dir) as writer:  # the folder is this run's from before the export on
        check_resume(checkpoint_dir, dataclasses.asdict(job))
        return _run_job(job, out_dir, writer, progress, isolate)


def _run_job(job: JobConfig, out_dir, writer, progress: bool, isolate: bool):
    out_dir = Path(out_dir)
    digits = load_digits() if job.data == "digits" else None  # scikit-learn: here, not in the training process
    scenario = job_scenario(job, digits)
    check_memory(job, scenario.input_shape, scenario.num_classes)  # before the export, not at the allocation after it
    if job.latent_split is not None:  # a point the model has no split at is refused before any export
        from edgecl.exporters import build_model
        from edgecl.exporters.latent import split_model

        kwargs = {} if job.width is None else {"width": job.width}
        split_model(build_model(job.model, scenario.input_shape, scenario.num_classes, **kwargs), job.latent_split)
    model, folder = _export_cached(job, scenario, out_dir)
    split_folder = None if job.latent_split is None else _export_cached(job, scenario, out_dir, job.latent_split)[1]
    if isolate and job.engine != "torch":
        from edgecl.bench.cl_process import train_in_child

        del scenario, model  # the training process loads its own
        result, plan_dict, plan, process = train_in_child(job, folder, split_folder, writer, progress, digits)
    else:
        if job.engine == "torch":
            from edgecl.exporters.reference import TorchEngine

            engine = TorchEngine.from_artifacts(model, folder, job.optimizer(), threads=job.threads)
        else:
            from edgecl.runtime import open_engine

            engine = open_engine(folder, job.optimizer(), threads=job.threads)
        result, plan_dict, plan = train_job(job, scenario, engine, split_folder, writer, progress)
        process = {"training": "host", "pid": os.getpid(), "torch_loaded": "torch" in sys.modules}
    process.update(host_pid=os.getpid(), host_peak_rss_bytes=peak_rss_bytes())
    return dataclasses.replace(result, config={**result.config, "process": process}), plan_dict, plan


def train_job(job: JobConfig, scenario: Scenario, engine, split_folder, writer, progress: bool):
    """Train `engine` (opened on the job's export) on `scenario` as `job` says: what either process runs.

    Args:
        split_folder: the latent-replay export (`job.latent_split`), else None. writer: the
            CheckpointWriter of the run's folder, or None.
    Returns:
        (RunResult, the plan as a dict, the MemoryPlan or None).
    """
    from edgecl.runtime import open_engine

    if job.nudge_ulp:
        nudge_one_ulp(engine)
    if job.latent_split is not None:
        from edgecl.runtime.latent import LatentReplay, PrefixEncoder

        suffix = open_engine(split_folder, job.optimizer(), threads=job.threads)
        engine = LatentReplay(suffix, PrefixEncoder(split_folder, suffix.manifest, job.threads), engine,
                              freeze_after=job.freeze_after - 1)
    learner, plan_dict, plan = build_learner(engine, scenario, job)
    strategy = job.strategy()
    label = strategy.label + (" +1 ulp" if job.nudge_ulp else "") + (
        f", latent replay at {job.latent_split} after task {job.freeze_after}" if job.latent_split else "")
    extra = {"job": dataclasses.asdict(job), "label": label,
             "budget_plan": plan_dict}
    if plan is not None and progress:
        print(plan.table(), flush=True)
    result = run_scenario(scenario, learner, job.run_config(), writer, progress, extra)
    return result, plan_dict, plan


def format_result(result: RunResult) -> str:
    """The accuracy matrix and the headline metrics as a terminal table."""
    r = np.array(result.acc_matrix)
    t = len(r)
    domain = result.config.get("job", {}).get("scenario") == "permuted"
    kind = "domain-IL" if domain else "class-IL"
    lines = [f"accuracy after each task ({kind}, %), {result.config.get('label', '')}",
             "after  " + "".join(f"  task{i + 1:<2}" for i in range(t))]
    for i in range(t):  # after task i, tasks j > i are not trained yet: "-" (their accuracy stays in the JSON)
        lines.append(f"task{i + 1:<3}" + "".join(f"{100 * v:>8.1f}" if j <= i and np.isfinite(v) else f"{'-':>8}"
                                                 for j, v in enumerate(r[i])))
    ratio = result.dense_train_flops / result.train_flops if result.train_flops else float("nan")
    lines += ["",
              f"ACC ({kind})    {100 * result.acc:6.2f} %" + ("" if domain else
                                                               f"      task-IL {100 * result.task_il_acc:6.2f} %"),
              f"BWT                {100 * result.bwt:6.2f}        forgetting {100 * result.forgetting:6.2f}",
              f"FWT                {100 * result.fwt:6.2f}",
              f"training FLOPs     {result.train_flops:.3e}  (dense {result.dense_train_flops:.3e}, {ratio:.2f}x fewer)",
              f"steps              {result.steps}",
              _peak_line(result),
              f"wall time          {result.wall_s:.1f} s" + ("  (resumed)" if result.resumed else "")]
    return "\n".join(lines)


def _peak_line(result: RunResult) -> str:
    """The peak RSS and the process it is of (config["process"], which a board's result has not)."""
    if not result.peak_rss_bytes:
        return "peak RSS  n/a"
    line = f"peak RSS           {result.peak_rss_bytes / 2**20:.1f} MiB"
    process = result.config.get("process")
    if process is None:
        return line
    if process["training"] == "runtime-only":
        host = process.get("host_peak_rss_bytes")
        return line + " (the training process: runtime-only, no torch; the export ran in the host process" + (
            f", peak {host / 2**20:.1f} MiB)" if host else ")")
    return line + " (the host process: export and training, torch included" + (
        "; the torch engine trains there)" if result.config.get("job", {}).get("engine") == "torch" else ")")


def plot_formats() -> tuple[str, ...]:
    """The file suffixes `plot_result` can write: what matplotlib's Agg canvas saves, less PGF (needs LaTeX)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return tuple(f".{ext}" for ext in FigureCanvasAgg.get_supported_filetypes() if ext != "pgf")


def plot_result(result: RunResult, path) -> Path:
    """The accuracy matrix as a heat map and accuracy per task over time (PNG, or any of `plot_formats`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = 100 * np.array(result.acc_matrix)
    t = len(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    im = ax1.imshow(r, vmin=0, vmax=100, cmap="viridis")
    for i in range(t):
        for j in range(t):
            ax1.text(j, i, f"{r[i, j]:.0f}", ha="center", va="center", color="w" if r[i, j] < 60 else "k", fontsize=8)
    ax1.set(xticks=range(t), yticks=range(t), xticklabels=[f"T{j + 1}" for j in range(t)],
            yticklabels=[f"after T{i + 1}" for i in range(t)], title="accuracy matrix R[t][i] (%)")
    fig.colorbar(im, ax=ax1, fraction=0.046)
    for j in range(t):
        ax2.plot(range(j + 1, t + 1), r[j:, j], marker="o", label=f"task {j + 1}")
    ax2.plot(range(1, t + 1), [r[i, : i + 1].mean() for i in range(t)], "k--", lw=2, label="mean of seen")
    ax2.set(xlabel="after training task", ylabel="accuracy (%)", ylim=(0, 100), xticks=range(1, t + 1),
            title=f"{result.config.get('label', '')}: accuracy per task over time")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
