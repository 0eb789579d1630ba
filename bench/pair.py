"""`bench pair`: the training steps of two exports in one process, taking turns call by call.

The question a change to the exporter raises is "is the new step graph faster than the old
one?", and on a shared machine two separate runs cannot answer it: timings drift by tens of
percent over minutes. Here both exports are opened as engines in one runtime-only process
(numpy and ONNX Runtime only, no torch), trained on the same random batch, and timed in pairs,
the order swapping every pair; the figure to read is the median of the per-pair ratios B / A.
Both exports must take the same input shape and classes (any engines, any exporter versions).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class PairResult:
    """Medians of `pairs` interleaved training steps of exports A and B.

    ratio: median over pairs of (B's step time / A's step time); ratio_iqr its spread.
    load: the machine's 1-minute load average before and after the timed pairs.
    """

    artifacts_a: str
    artifacts_b: str
    engines: tuple[str, str]
    batch: int
    threads: int
    pairs: int
    warmup: int
    median_ms: tuple[float, float]
    ratio: float
    ratio_iqr: float
    onnxruntime: str
    load: tuple[float, float]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _positive(name, value, least=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name}={value!r}; accepted: an integer >= {least}")


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not every platform has it
        return float("nan")


def measure_pair(artifacts_a, artifacts_b, *, batch: int = 32, threads: int = 2, pairs: int = 20,
                 warmup: int = 3, seed: int = 0) -> PairResult:
    """Time one training step of each export, interleaved, in this process.

    Raises:
        ValueError: a count below its minimum, or two exports of different inputs or classes.
        ArtifactError: a folder that is not an intact export.
    """
    from edgecl.runtime import OptimizerConfig, load_manifest, open_engine
    from edgecl.runtime.session import ort

    for name, value, least in (("batch", batch, 1), ("threads", threads, 1), ("pairs", pairs, 1),
                               ("warmup", warmup, 0)):
        _positive(name, value, least)
    ma, mb = load_manifest(artifacts_a), load_manifest(artifacts_b)
    if (tuple(ma.input_shape), ma.num_classes) != (tuple(mb.input_shape), mb.num_classes):
        raise ValueError(f"artifacts_b={str(artifacts_b)!r} takes {tuple(mb.input_shape)} -> {mb.num_classes} classes, "
                         f"artifacts_a={str(artifacts_a)!r} {tuple(ma.input_shape)} -> {ma.num_classes}; accepted: "
                         "two exports of the same input shape and classes")
    sgd = OptimizerConfig("sgd", lr=0.01, momentum=0.9)
    engines = [open_engine(artifacts_a, sgd, threads=threads), open_engine(artifacts_b, sgd, threads=threads)]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *ma.input_shape), dtype=np.float32)
    y = rng.integers(0, ma.num_classes, batch)
    for engine in engines:
        for _ in range(warmup):
            engine.step(x, y)
    times = np.zeros((pairs, 2))
    load_before = _load_average()
    for i in range(pairs):
        for k in (0, 1) if i % 2 == 0 else (1, 0):
            start = time.perf_counter()
            engines[k].step(x, y)
            times[i, k] = time.perf_counter() - start
    ratios = times[:, 1] / times[:, 0]
    q1, q3 = np.percentile(ratios, [25, 75])
    return PairResult(str(artifacts_a), str(artifacts_b), (ma.engine, mb.engine), batch, threads, pairs, warmup,
                      tuple(float(np.median(times[:, k]) * 1e3) for k in (0, 1)), float(np.median(ratios)),
                      float(q3 - q1), ort.__version__, (load_before, _load_average()))


def format_pair(result: PairResult) -> str:
    a, b = (Path(p).name or p for p in (result.artifacts_a, result.artifacts_b))
    return "\n".join([
        f"{result.pairs} interleaved training steps each (after {result.warmup} warm-up), batch {result.batch}, "
        f"{result.threads} threads, onnxruntime {result.onnxruntime}, load average {result.load[0]:.2f} -> "
        f"{result.load[1]:.2f}",
        f"A {a} ({result.engines[0]}): median {result.median_ms[0]:.3f} ms",
        f"B {b} ({result.engines[1]}): median {result.median_ms[1]:.3f} ms",
        f"B / A per pair: median {result.ratio:.3f}, IQR {result.ratio_iqr:.3f}",
    ])
