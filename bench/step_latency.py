"""Per-step training latency of each engine against torch eager, same model, batch and threads."""

from __future__ import annotations

import dataclasses

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


def step_latency(model: str = "cnn", input_shape=(1, 8, 8), batch: int = 32, threads: int = 2, repeats: int = 50,
                 warmup: int = 5, engines=ENGINES, seed: int = 0) -> StepLatency:
    """Median training-step time of each engine, the engines taking turns (`bench step`).

    The training phase of `edgecl.bench.latency.measure_latency`, without inference or cold starts.

    Raises:
        ValueError: repeats < 3, batch or threads < 1, an unknown engine or model.
    """
    from .latency import LatencyConfig, measure_latency

    if repeats < 3:
        raise ValueError(f"repeats={repeats}; accepted: >= 3")
    config = LatencyConfig(model, tuple(input_shape), batch, threads, repeats, warmup, 0, tuple(engines),
                           ("train",), seed=seed)
    rows = measure_latency(config).rows
    return StepLatency(model, config.input_shape, batch, threads, repeats, {r.engine: r.median_ms for r in rows},
                       {r.engine: r.iqr_ms for r in rows})


def format_table(r: StepLatency) -> str:
    rows = [f"{r.model} {'x'.join(map(str, r.input_shape))}, batch {r.batch}, {r.threads} threads, {r.repeats} steps",
            f"{'engine':<14}{'median ms':>10}{'IQR ms':>9}{'vs torch':>10}"]
    for name, med in r.median_ms.items():
        rows.append(f"{name:<14}{med:>10.3f}{r.iqr_ms[name]:>9.3f}{r.ratio(name) if 'torch' in r.median_ms else float('nan'):>9.2f}x")
    return "\n".join(rows)
