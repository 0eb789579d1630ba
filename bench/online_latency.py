"""`bench online`: what one call of the app-facing online learner costs, `learn` and `predict`, per method.

Each method's `OnlineLearner` is opened on the same export, in this process, with the buffer of
`edgecl.bench.stream_run` (the most examples whose storage fits in `buffer_bytes`), and first
learns `fill` random samples so that every timed step replays full batches (the steady state of
an app; DER++ draws two replay batches, ER one). Then, round after round, every method makes each
call once (`learn` of `learn_sizes` samples, `predict` of `predict_sizes`), the methods taking
turns in an order that rotates every round, so a slow spell of a shared machine lands on all of
them alike. Medians and 90th percentiles summarise the calls. The learners keep learning while
timed, so the periodic work an app meets is in the figures: DGM's gradient masks (every 30 steps)
and TDM's mask updates (every `tdm_every` steps) show in the p90 more than in the median.

Inputs are random: standard normal x of the export's input shape, uniform labels. Only numpy and
`edgecl.runtime` are imported here; the host's export runs in another interpreter
(`edgecl.bench.export_cache.export_in_child`) or the user's export is used as it is.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgecl.runtime.manifest import load_manifest
from edgecl.runtime.online import OnlineLearner, open_learner

from .stream_run import LABELS, STREAM_METHODS, StreamConfig, buffer_capacity

CALL_KINDS = ("learn", "predict")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnlineLatencyConfig:
    """What `measure_online_latency` measures.

    Args:
        methods: names of `edgecl.bench.stream_run.STREAM_METHODS`. sparsity: SparCL's.
        learn_sizes: samples per timed `learn` call (each size one row). predict_sizes: per `predict`.
        buffer_bytes, replay_batch, replay_steps, batch_size, lr, tdm_every: the learners' settings
            (as `bench stream`). threads: ONNX Runtime intra-op threads of every learner.
        repeats: timed calls of each kind per method. warmup: untimed rounds first.
        fill: samples learnt (in calls of 8) before the warm-up; None: 2 * replay_batch, so the
            buffer holds a full replay batch. seed: the learners' seed and the random inputs.
    Raises:
        ValueError: naming the bad field and what is accepted.
    """

    methods: tuple = ("finetune", "er", "derpp", "sparcl-derpp")
    sparsity: float = 0.75
    learn_sizes: tuple = (1, 8)
    predict_sizes: tuple = (1,)
    buffer_bytes: str | int = "8MiB"
    replay_batch: int = 32
    replay_steps: int = 0
    batch_size: int = 32
    lr: float = 0.03
    tdm_every: int = 250
    threads: int = 2
    repeats: int = 30
    warmup: int = 3
    fill: int | None = None
    seed: int = 0

    def __post_init__(self):
        for name in ("methods", "learn_sizes", "predict_sizes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("learn_sizes", "predict_sizes"):
            sizes = getattr(self, name)
            if any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in sizes) \
                    or len(set(sizes)) != len(sizes):
                raise ValueError(f"{name}={list(sizes)}; accepted: distinct integers >= 1 (may be empty)")
        if not self.learn_sizes and not self.predict_sizes:
            raise ValueError("learn_sizes and predict_sizes are both empty; accepted: at least one call to time")
        for name, low in (("repeats", 3), ("warmup", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r}; accepted: an integer >= {low}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ValueError(f"seed={self.seed!r}; accepted: an integer in [0, 2**64 - 1]")
        if self.fill is not None and (isinstance(self.fill, bool) or not isinstance(self.fill, int) or self.fill < 0):
            raise ValueError(f"fill={self.fill!r}; accepted: an integer >= 0, or None (2 * replay_batch)")
        self.stream_config()  # methods, sparsity, sizes, lr, steps, threads, seed: the learner's own checks

    def stream_config(self) -> StreamConfig:
        """The same learner settings as a `bench stream` config (which builds `open_learner`'s arguments)."""
        return StreamConfig(methods=self.methods, seeds=(self.seed,), sparsity=self.sparsity,
                            buffer_bytes=self.buffer_bytes, lr=self.lr, batch_size=self.batch_size,
                            replay_batch=self.replay_batch, replay_steps=self.replay_steps, tdm_every=self.tdm_every,
                            threads=self.threads)

    @property
    def fill_samples(self) -> int:
        return 2 * self.replay_batch if self.fill is None else self.fill

    def calls(self) -> list[tuple[str, int]]:
        """(kind, samples) of every timed call of a round, e.g. [("learn", 1), ("learn", 8), ("predict", 1)]."""
        return [("learn", n) for n in self.learn_sizes] + [("predict", n) for n in self.predict_sizes]


@dataclasses.dataclass(frozen=True)
class OnlineLatencyRow:
    """One call of one method: median and 90th percentile of its latency in ms over `repeats` calls."""

    model: str
    method: str
    call: str  # e.g. "learn(8)"
    samples: int
    median_ms: float
    p90_ms: float
    repeats: int


@dataclasses.dataclass(frozen=True)
class OnlineLatencyResult:
    """Rows per (method, call), with what they were measured under."""

    model: str
    input_shape: tuple
    config: dict
    rows: tuple
    buffer_capacity: dict  # method -> replay examples
    torch_loaded: bool
    omp_wait_policy: str | None
    load_average: tuple | None  # 1-minute load average before and after

    def row(self, method: str, call: str) -> OnlineLatencyRow:
        """The row of `method` and `call` (e.g. "learn(1)").

        Raises:
            KeyError: no such row (the rows present are listed).
        """
        for r in self.rows:
            if (r.method, r.call) == (method, call):
                return r
        raise KeyError(f"no row for {method!r} {call!r}; rows: {', '.join(f'{r.method} {r.call}' for r in self.rows)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def random_samples(n: int, input_shape, num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n standard-normal float32 inputs of `input_shape` and uniform int64 labels."""
    return rng.standard_normal((n, *input_shape), dtype=np.float32), rng.integers(0, num_classes, n)


def open_filled(folder, state_dir, method: str, config: OnlineLatencyConfig) -> OnlineLearner:
    """A method's learner on `folder` that has learnt `config.fill_samples` random samples (calls of 8).

    Raises:
        ValueError: a bad setting (the learner's message).
    """
    manifest = load_manifest(folder)
    stream = config.stream_config()
    capacity = buffer_capacity(stream, method, tuple(manifest.input_shape), manifest.num_classes)
    learner = open_learner(folder, state_dir, **stream.learner_settings(method, config.seed, capacity or None))
    rng = np.random.default_rng([config.seed, 1])
    for start in range(0, config.fill_samples, 8):
        learner.learn(*random_samples(min(8, config.fill_samples - start), learner.input_shape,
                                      learner.num_classes, rng))
    return learner


def call(learner: OnlineLearner, kind: str, x: np.ndarray, y: np.ndarray):
    """One `learn(x, y)` or `predict(x)` (kind in CALL_KINDS)."""
    return learner.learn(x, y) if kind == "learn" else learner.predict(x)


def measure_online_latency(artifacts, config: OnlineLatencyConfig = OnlineLatencyConfig(),
                           model: str | None = None) -> OnlineLatencyResult:
    """Time `learn` and `predict` of each method on one export (see the module's docstring).

    Args:
        artifacts: the export (the host's cache or the user's). model: its label in the rows
            (None: the folder's name).
    Returns:
        OnlineLatencyResult with one row per (method, call), in `config.methods` x `config.calls()` order.
    Raises:
        ValueError: a bad setting. ArtifactError: the folder is not a loadable export.
    """
    folder = Path(artifacts)
    model = folder.name if model is None else model
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rng = np.random.default_rng([config.seed, 2])
    methods, calls = config.methods, config.calls()
    times = {(m, c): [] for m in methods for c in calls}
    with tempfile.TemporaryDirectory(prefix="edgecl-online-") as tmp:
        learners = {m: open_filled(folder, Path(tmp) / m, m, config) for m in methods}
        try:
            shape, k = learners[methods[0]].input_shape, learners[methods[0]].num_classes
            for r in range(config.warmup + config.repeats):
                turn = r % len(methods)
                for m in methods[turn:] + methods[:turn]:  # rotated: no method always runs first
                    for kind, n in calls:
                        x, y = random_samples(n, shape, k, rng)
                        start = time.perf_counter()
                        call(learners[m], kind, x, y)
                        if r >= config.warmup:
                            times[(m, (kind, n))].append(time.perf_counter() - start)
            capacity = {m: 0 if learners[m].buffer is None else learners[m].buffer.capacity for m in methods}
        finally:
            for learner in learners.values():
                learner.close()
    rows = []
    for (m, (kind, n)), t in times.items():
        ms = 1e3 * np.array(t)
        rows.append(OnlineLatencyRow(model, m, f"{kind}({n})", n, float(np.median(ms)), float(np.percentile(ms, 90)),
                                     len(ms)))
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return OnlineLatencyResult(model, tuple(shape), dataclasses.asdict(config), tuple(rows), capacity,
                               sys.modules.get("torch") is not None, os.environ.get("OMP_WAIT_POLICY"),
                               None if load_before is None else (load_before, load_after))


def format_table(result: OnlineLatencyResult) -> str:
    """Median and p90 ms per call, one row per method, one column pair per call."""
    c = result.config
    calls = list(dict.fromkeys(r.call for r in result.rows))
    sparsity = c["sparsity"]
    head = (f"{result.model} {'x'.join(map(str, result.input_shape))}: latency of one call (ms, median / p90 of "
            f"{c['repeats']}), {c['threads']} thread(s), replay_batch {c['replay_batch']}, replay_steps "
            f"{c['replay_steps']}, buffer {c['buffer_bytes']}")
    labels = {m: LABELS[m] + (f" {sparsity:.2f}" if STREAM_METHODS[m][1] else "") for m in c["methods"]}
    width = max(len(v) for v in labels.values()) + 2
    lines = [head, f"{'method':<{width}}" + "".join(f"{name:>20}" for name in calls) + f"{'buffer':>8}"]
    for m in c["methods"]:
        cells = [result.row(m, name) for name in calls]
        lines.append(f"{labels[m]:<{width}}" + "".join(f"{f'{r.median_ms:.2f} / {r.p90_ms:.2f}':>20}" for r in cells)
                     + f"{result.buffer_capacity[m]:>8}")
    if result.load_average is not None:
        lines.append(f"1-minute load average {result.load_average[0]:.2f} before, {result.load_average[1]:.2f} after")
    return "\n".join(lines)
