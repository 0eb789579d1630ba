"""`bench stream`: the app-facing online learner on a class-incremental stream, each sample seen once.

The stream: the classes of a data set arrive two at a time (5 tasks, in the natural order 0-1,
2-3, ... or a seeded one), the examples of a task in a seeded random order, in groups of
`group` = (lo, hi) samples (sizes uniform, seeded; a task's last group may be shorter; no group
straddles two tasks). Every method of a seed gets the same stream, one `OnlineLearner.learn(x, y)`
per group and nothing else: no task ids, no `end_task` (task-free), no epochs. When a task's last
group has gone by, each learner is evaluated on the test examples of every task seen so far (the
accuracy matrix's row R[t][0..t]); the final accuracy is over the whole test set, all classes.

The methods of one seed run side by side in this process, taking turns group by group (the order
rotating every group), so a slow spell of a shared machine lands on every method alike and their
wall times pair up. Only numpy and `edgecl.runtime` are imported here: the artifacts come from
the host's export cache (`edgecl.bench.export_cache.export_in_child`, torch in another process)
or from the user's export.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgecl.runtime.buffer import bytes_per_example
from edgecl.runtime.data import load_digits, load_fashion_mnist
from edgecl.runtime.dataset import Dataset
from edgecl.runtime.manifest import load_manifest
from edgecl.runtime.online import open_learner
from edgecl.runtime.online_config import OnlineConfig
from edgecl.runtime.scenarios import Scenario, split_scenario, train_test_split
from edgecl.runtime.sizes import parse_bytes

DATASETS = ("digits", "fashion-mnist")
DATA_SHAPES = {"digits": (1, 8, 8), "fashion-mnist": (1, 28, 28)}  # one sample of each, 10 classes
DATA_LR = {"digits": 0.1, "fashion-mnist": 0.03}  # edgecl run's (edgecl.bench.cl_run.DATA_DEFAULTS)
CLASS_ORDERS = ("natural", "seeded")
N_TASKS = 5
# name -> (OnlineConfig method, SparCL on it)
STREAM_METHODS = {"finetune": ("finetune", False), "er": ("er", False), "derpp": ("derpp", False),
                  "sparcl-er": ("er", True), "sparcl-derpp": ("derpp", True)}
LABELS = {"finetune": "Fine-tune", "er": "ER", "derpp": "DER++", "sparcl-er": "SparCL-ER",
          "sparcl-derpp": "SparCL-DER++"}
EVAL_BATCH = 1000  # test examples per predict call


def _int_at_least(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r}; accepted: an integer >= {low}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamConfig:
    """What `run_stream` runs.

    Args:
        data: "digits" (seconds) or "fashion-mnist" (the Debian package's 60 000 / 10 000).
        methods: names of STREAM_METHODS; SparCL's take `sparsity`. seeds: one stream (order, groups),
            one model initialisation (the cache's export of that seed) and one learner seed each.
        group: (lo, hi) samples per `learn` call, uniform; (1, 1): one sample at a time.
        sparsity: SparCL's weight sparsity. buffer_bytes: each replay method's buffer holds the most
            examples whose storage (input, label, logits for DER++, task id) fits in it.
        lr: SGD learning rate (None: the data set's, as `edgecl run`). batch_size, replay_batch,
            replay_steps, tdm_every: `open_learner`'s (replay_steps is 0 for fine-tuning, which
            replays nothing). class_order: "natural" (0-1, 2-3, ...) or "seeded" (a permutation per seed).
        train_per_class: at most this many training examples of each class (a fixed random subset
            per seed; None: all). threads: ONNX Runtime intra-op threads of every learner.
        model: the built-in family exported for the run (`edgecl run`'s default: cnn).
    Raises:
        ValueError: naming the bad field and what is accepted.
    """

    data: str = "digits"
    methods: tuple = ("finetune", "er", "derpp", "sparcl-derpp")
    seeds: tuple = (0, 1, 2)
    group: tuple = (1, 8)
    sparsity: float = 0.75
    buffer_bytes: str | int = "8MiB"
    lr: float | None = None
    batch_size: int = 32
    replay_batch: int = 32
    replay_steps: int = 0
    tdm_every: int = 250
    class_order: str = "natural"
    train_per_class: int | None = None
    threads: int = 1
    model: str = "cnn"

    def __post_init__(self):
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        object.__setattr__(self, "group", tuple(self.group))
        if self.data not in DATASETS:
            raise ValueError(f"data={self.data!r}; accepted: {', '.join(DATASETS)}")
        unknown = [m for m in self.methods if m not in STREAM_METHODS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods={list(self.methods)}; accepted: distinct names among {', '.join(STREAM_METHODS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(
                isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < 2**64 for s in self.seeds):
            raise ValueError(f"seeds={list(self.seeds)}; accepted: one or more distinct integers in [0, 2**64 - 1]")
        if len(self.group) != 2 or any(isinstance(g, bool) or not isinstance(g, (int, np.integer)) for g in self.group) \
                or not 1 <= self.group[0] <= self.group[1]:
            raise ValueError(f"group={self.group!r}; accepted: (lo, hi) integers with 1 <= lo <= hi")
        if self.class_order not in CLASS_ORDERS:
            raise ValueError(f"class_order={self.class_order!r}; accepted: {', '.join(CLASS_ORDERS)}")
        if self.train_per_class is not None:
            _int_at_least("train_per_class", self.train_per_class, 1)
        try:
            if bytes_per_example((1,), 2) > parse_bytes(self.buffer_bytes):
                raise ValueError("smaller than any example")
        except ValueError as e:
            raise ValueError(f"buffer_bytes={self.buffer_bytes!r}: {e}") from None
        for method in self.methods:  # lr, batch sizes, steps, threads, sparsity: the learner's own checks
            OnlineConfig(**self.learner_settings(method, 0, None if method == "finetune" else 1))

    @property
    def learning_rate(self) -> float:
        return DATA_LR[self.data] if self.lr is None else self.lr

    def learner_settings(self, method: str, seed: int, buffer: int | None) -> dict:
        """`open_learner`'s keyword arguments for one method (a name of STREAM_METHODS), seed and buffer."""
        base, sparse = STREAM_METHODS[method]
        return dict(method=base, sparsity=self.sparsity if sparse else None, tdm_every=self.tdm_every, budget=None,
                    buffer=buffer, batch_size=self.batch_size, replay_batch=self.replay_batch,
                    replay_steps=0 if base == "finetune" else self.replay_steps, lr=self.learning_rate, seed=seed,
                    threads=self.threads)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "lr": self.learning_rate}


@dataclasses.dataclass(frozen=True)
class MethodRun:
    """One method on one seed's stream.

    final_acc: accuracy over the whole test set after the last group. acc_matrix: R[t][i], the
    accuracy on task i's test set after task t's last group (None for i > t). learn_s: the sum of
    the `learn` calls' wall times; call_ms_median / call_ms_p90 over those calls. steps: training
    steps taken (replay-only steps included). buffer_capacity: replay examples (0: fine-tuning).
    """

    method: str
    seed: int
    final_acc: float
    acc_matrix: list
    learn_s: float
    eval_s: float
    calls: int
    samples: int
    steps: int
    buffer_capacity: int
    call_ms_median: float
    call_ms_p90: float
    train_flops: float = 0.0
    dense_train_flops: float = 0.0

    @property
    def seen_acc(self) -> list[float]:
        """The mean of R[t][0..t] at each task boundary t."""
        return [float(np.mean(row[: t + 1])) for t, row in enumerate(self.acc_matrix)]


@dataclasses.dataclass(frozen=True)
class StreamResult:
    """Every (method, seed) run of `run_stream`, with what they ran under."""

    config: dict
    runs: tuple
    task_classes: dict  # seed -> the classes of each task
    torch_loaded: bool  # whether torch was in this process's modules when the runs ended
    omp_wait_policy: str | None
    load_average: tuple | None = None  # 1-minute load average before and after (a shared machine's other work)

    def of(self, method: str) -> list[MethodRun]:
        return [r for r in self.runs if r.method == method]

    def paired_ratio(self, method: str, baseline: str) -> list[float]:
        """learn_s of `method` / learn_s of `baseline`, seed by seed (both ran in turns, same process)."""
        base = {r.seed: r.learn_s for r in self.of(baseline)}
        return [r.learn_s / base[r.seed] for r in self.of(method) if r.seed in base]

    def summary(self) -> list[dict]:
        """Per method: mean and sample std over seeds of the final accuracy, of the mean accuracy
        over seen tasks at each boundary, and of learn_s; the median call latency of all seeds."""
        rows = []
        for method in self.config["methods"]:
            runs = self.of(method)
            seen = np.array([r.seen_acc for r in runs])
            rows.append({"method": method, "label": _label(method, self.config["sparsity"]), "seeds": len(runs),
                         "final_acc": _mean_std([r.final_acc for r in runs]),
                         "seen_acc": [_mean_std(seen[:, t]) for t in range(seen.shape[1])],
                         "learn_s": _mean_std([r.learn_s for r in runs]),
                         "call_ms_median": float(np.median([r.call_ms_median for r in runs])),
                         "call_ms_p90": float(np.median([r.call_ms_p90 for r in runs])),
                         "buffer_capacity": runs[0].buffer_capacity,
                         "train_flops": float(np.mean([r.train_flops for r in runs]))})
        return rows

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for run, d in zip(self.runs, out["runs"]):
            d["seen_acc"] = run.seen_acc
        out["summary"] = self.summary()
        if {"derpp", "sparcl-derpp"} <= set(self.config["methods"]):
            out["sparcl_derpp_over_derpp_learn_s"] = _mean_std(self.paired_ratio("sparcl-derpp", "derpp"))
        return out


def _label(method: str, sparsity: float) -> str:
    return LABELS[method] + (f" {sparsity:.2f}" if STREAM_METHODS[method][1] else "")


def _mean_std(values) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "values": v.tolist()}


def stream_groups(task_sizes, group: tuple[int, int], rng: np.random.Generator) -> list[list[np.ndarray]]:
    """Each task's examples in a random order, cut into consecutive groups of lo..hi (uniform).

    Args:
        task_sizes: training examples of each task. group: (lo, hi). rng: draws orders and sizes.
    Returns:
        per task, a list of int64 index arrays into that task's examples: every index exactly once;
        every group of lo..hi indices but the task's last, which may be shorter.
    """
    lo, hi = group
    tasks = []
    for n in task_sizes:
        order = rng.permutation(n)
        sizes = rng.integers(lo, hi + 1, size=n // lo + 1)
        ends = np.cumsum(sizes)
        ends = np.append(ends[ends < n], n)
        tasks.append(np.split(order, ends[:-1]))
    return tasks


def per_class_subset(data: Dataset, per_class: int, rng: np.random.Generator) -> Dataset:
    """At most `per_class` examples of each class, drawn at random, in their original order."""
    keep = np.concatenate([rng.permutation(np.flatnonzero(data.y == c))[:per_class] for c in range(data.num_classes)])
    keep.sort()
    return Dataset(data.name, data.x[keep], data.y[keep], data.num_classes)


def load_stream_scenario(config: StreamConfig, seed: int) -> Scenario:
    """The 5 tasks of 2 classes of `config.data` for one seed (digits: `edgecl run`'s split of that seed)."""
    if config.data == "digits":
        train, test = train_test_split(load_digits(), 0.2, seed)
    else:
        train, test = load_fashion_mnist(split="train"), load_fashion_mnist(split="test")
    if config.train_per_class is not None:
        train = per_class_subset(train, config.train_per_class, np.random.default_rng([seed, 2]))
    return split_scenario(train, test, N_TASKS, class_order=None if config.class_order == "natural" else "random",
                          seed=seed, name=f"split-{config.data}")


def buffer_capacity(config: StreamConfig, method: str, input_shape, num_classes: int) -> int:
    """Replay examples of a method: the most whose storage fits in `buffer_bytes` (0: no buffer)."""
    base = STREAM_METHODS[method][0]
    if base == "finetune":
        return 0
    return parse_bytes(config.buffer_bytes) // bytes_per_example(input_shape, num_classes, store_logits=base == "derpp")


def _accuracy(learner, x: np.ndarray, y: np.ndarray) -> float:
    hits = sum(int((learner.predict(x[i : i + EVAL_BATCH]) == y[i : i + EVAL_BATCH]).sum())
               for i in range(0, len(x), EVAL_BATCH))
    return hits / len(x)


def run_stream(config: StreamConfig, artifacts, progress: bool = True) -> StreamResult:
    """Run every method of `config` on each seed's stream (see the module's docstring).

    Args:
        artifacts: {seed: artifact folder} (the cache's export of each seed's initialisation), or one
            folder for every seed (the user's export); its input shape must be the data's.
        progress: a tqdm bar over the groups (stderr).
    Returns:
        StreamResult with one MethodRun per (method, seed).
    Raises:
        ValueError: a seed without artifacts, artifacts of another input shape or fewer classes, or a
            `buffer_bytes` that holds no example; before any run.
    """
    from tqdm import tqdm

    folders = artifacts if isinstance(artifacts, dict) else {seed: artifacts for seed in config.seeds}
    missing = [s for s in config.seeds if s not in folders]
    if missing:
        raise ValueError(f"no artifacts for seeds {missing}; accepted: a folder per seed of {list(config.seeds)}")
    scenarios = {seed: load_stream_scenario(config, seed) for seed in config.seeds}
    for seed, folder in folders.items():
        if seed in scenarios:
            _check_artifacts(folder, scenarios[seed])
    shape, k = scenarios[config.seeds[0]].input_shape, load_manifest(folders[config.seeds[0]]).num_classes
    for method in config.methods:
        if STREAM_METHODS[method][0] != "finetune" and buffer_capacity(config, method, shape, k) < 1:
            raise ValueError(f"buffer_bytes={config.buffer_bytes!r} holds no example of {shape} for {method}; "
                             f"accepted: at least {bytes_per_example(shape, k, STREAM_METHODS[method][0] == 'derpp')} "
                             "bytes")
    streams = {seed: stream_groups([len(t.y_train) for t in sc.tasks], config.group, np.random.default_rng(seed))
               for seed, sc in scenarios.items()}
    total = sum(len(groups) for stream in streams.values() for groups in stream)
    load_before = _load_average()
    runs = []
    with tqdm(total=total, desc="stream", unit="group", disable=not progress, leave=False) as bar:
        for seed in config.seeds:
            runs += _run_seed(config, seed, Path(folders[seed]), scenarios[seed], streams[seed], bar)
    torch_loaded = sys.modules.get("torch") is not None
    return StreamResult(config.to_dict(), tuple(runs), {s: [list(t.classes) for t in sc.tasks]
                                                        for s, sc in scenarios.items()},
                        torch_loaded, os.environ.get("OMP_WAIT_POLICY"),
                        None if load_before is None else (load_before, _load_average()))


def _load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _check_artifacts(folder, scenario: Scenario) -> None:
    manifest = load_manifest(folder)
    if tuple(manifest.input_shape) != scenario.input_shape or manifest.num_classes < scenario.num_classes:
        raise ValueError(f"artifacts {str(folder)!r} take {tuple(manifest.input_shape)} with {manifest.num_classes} "
                         f"classes; accepted: an export for {scenario.name}'s {scenario.input_shape} with at least "
                         f"{scenario.num_classes} classes")


def _run_seed(config: StreamConfig, seed: int, folder: Path, scenario: Scenario, stream, bar) -> list[MethodRun]:
    methods = config.methods
    k = load_manifest(folder).num_classes  # the logits the buffer stores
    capacity = {m: buffer_capacity(config, m, scenario.input_shape, k) for m in methods}
    times = {m: [] for m in methods}
    eval_s = dict.fromkeys(methods, 0.0)
    matrix = {m: [] for m in methods}
    with tempfile.TemporaryDirectory(prefix="edgecl-stream-") as tmp:
        learners = {m: open_learner(folder, Path(tmp) / m, **config.learner_settings(m, seed, capacity[m] or None))
                    for m in methods}
        try:
            calls = 0
            for t, task in enumerate(scenario.tasks):
                for idx in stream[t]:
                    x, y = task.x_train[idx], task.y_train[idx]
                    turn = calls % len(methods)
                    for m in methods[turn:] + methods[:turn]:  # rotated: no method always runs first
                        start = time.perf_counter()
                        learners[m].learn(x, y)
                        times[m].append(time.perf_counter() - start)
                    calls += 1
                    bar.update()
                for m in methods:  # the boundary: every task seen so far
                    start = time.perf_counter()
                    row = [_accuracy(learners[m], seen.x_test, seen.y_test) for seen in scenario.tasks[: t + 1]]
                    matrix[m].append(row + [None] * (len(scenario.tasks) - t - 1))
                    eval_s[m] += time.perf_counter() - start
            x_test = np.concatenate([task.x_test for task in scenario.tasks])
            y_test = np.concatenate([task.y_test for task in scenario.tasks])
            runs = []
            for m in methods:
                ms, inner = 1e3 * np.array(times[m]), learners[m].learner
                runs.append(MethodRun(m, seed, _accuracy(learners[m], x_test, y_test), matrix[m], float(sum(times[m])),
                                      eval_s[m], len(times[m]), learners[m].samples_seen, inner.step, capacity[m],
                                      float(np.median(ms)), float(np.percentile(ms, 90)), inner.train_flops,
                                      inner.dense_train_flops))
            return runs
        finally:
            for learner in learners.values():
                learner.close()
