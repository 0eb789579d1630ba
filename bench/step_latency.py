"""Per-step training latency of each engine against torch eager, same model, batch and threads."""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time

import numpy as np

ENGINES = ("torch", "portable", "ort-training")


@dataclasses.dataclass(frozen=True)
class StepLatency:
    """Median and spread (interquartile range) of one training step per engine, in ms."""

    model: str
    input_shape: tuple
    batch: int
    threads: int
    repeats: int
    median_ms: dict
    iqr_ms: dict

    def ratio(self, engine: str) -> float:
        """engine median / torch eager median (below 1: faster than torch)."""
        return self.median_ms[engine] / self.median_ms["torch"]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ratio_to_torch"] = {e: self.ratio(e) for e in self.median_ms}
        return d


def _time_steps(step, x, y, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        step(x, y)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(x, y)
        times.append(1000 * (time.perf_counter() - t0))
    return times


def step_latency(model: str = "cnn", input_shape=(1, 8, 8), batch: int = 32, threads: int = 2, repeats: int = 50,
                 warmup: int = 5, engines=ENGINES, seed: int = 0) -> StepLatency:
    """Export `model` for both ONNX engines and time `engine.step` for each engine, interleaved.

    Rounds alternate between engines so that a slow spell of the machine hits all alike.
    """
    import torch

    from edgecl.exporters import build_model, export
    from edgecl.exporters.reference import TorchEngine
    from edgecl.runtime import open_engine

    if repeats < 3 or batch < 1 or threads < 1:
        raise ValueError(f"repeats={repeats}, batch={batch}, threads={threads}; accepted: repeats >= 3, others >= 1")
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise ValueError(f"engines {sorted(unknown)} are unknown; accepted: {', '.join(ENGINES)}")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch_model = build_model(model, input_shape, 10, seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.random((batch, *input_shape), dtype=np.float32)
    y = rng.integers(0, 10, batch)
    with tempfile.TemporaryDirectory() as tmp:
        opened = {}
        for name in engines:
            if name == "torch":
                opened[name] = TorchEngine(torch_model, input_shape, 10, threads=threads)
            else:
                export(torch_model, torch.zeros(2, *input_shape), f"{tmp}/{name}", engine=name)
                opened[name] = open_engine(f"{tmp}/{name}", threads=threads)
        times = {name: [] for name in opened}
        rounds = 5
        for _ in range(rounds):
            for name, engine in opened.items():
                times[name] += _time_steps(engine.step, x, y, warmup, max(1, repeats // rounds))
    median = {n: statistics.median(t) for n, t in times.items()}
    iqr = {n: float(np.subtract(*np.percentile(t, [75, 25]))) for n, t in times.items()}
    return StepLatency(model, tuple(input_shape), batch, threads, repeats, median, iqr)


def format_table(r: StepLatency) -> str:
    rows = [f"{r.model} {'x'.join(map(str, r.input_shape))}, batch {r.batch}, {r.threads} threads, {r.repeats} steps",
            f"{'engine':<14}{'median ms':>10}{'IQR ms':>9}{'vs torch':>10}"]
    for name, med in r.median_ms.items():
        rows.append(f"{name:<14}{med:>10.3f}{r.iqr_ms[name]:>9.3f}{r.ratio(name) if 'torch' in r.median_ms else float('nan'):>9.2f}x")
    return "\n".join(rows)
