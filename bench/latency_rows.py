"""What `bench latency` returns, and how it times: rows, cold-start detail, the result, interleaved calls.

Apart from `latency` (which measures) so that the channel-density measurement
(`channel_bench`) builds the same rows without importing the module that dispatches to it.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import numpy as np

PHASES = ("train", "infer", "cold_start")
SOURCES = ("measured", "projected")


@dataclasses.dataclass(frozen=True)
class LatencyRow:
    """One engine and phase: median and interquartile range in ms, and median / torch eager's median."""

    model: str
    engine: str
    target: str
    source: str
    phase: str
    median_ms: float
    iqr_ms: float
    ratio_to_torch: float | None

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"source={self.source!r}; accepted: {', '.join(SOURCES)}")
        if self.phase not in PHASES:
            raise ValueError(f"phase={self.phase!r}; accepted: {', '.join(PHASES)}")
        if not (self.median_ms > 0 and self.iqr_ms >= 0):
            raise ValueError(f"median_ms={self.median_ms!r}, iqr_ms={self.iqr_ms!r}; accepted: median > 0, IQR >= 0")


@dataclasses.dataclass(frozen=True)
class ColdStartDetail:
    """Medians over the fresh processes of one engine, in ms from spawn: where the cold start goes."""

    engine: str
    process: str
    runs: int
    python_ms: float
    imports_ms: float
    open_ms: float
    first_step_ms: float
    torch_imported: bool  # in any run; must be False for a runtime-only process


@dataclasses.dataclass(frozen=True)
class LatencyResult:
    """Result of `measure_latency`: rows (measured, then projected), cold-start detail, conditions;
    with channel densities, `channels` (`edgecl.bench.channel_bench.ChannelRow`s against the dense
    portable rows) and the 1-minute load average before and after."""

    config: object  # the `latency.LatencyConfig` measured
    rows: tuple
    cold_start: tuple
    omp_wait_policy: str
    projection_note: str = ""
    channels: tuple = ()
    load_average: tuple | None = None

    def row(self, engine: str, phase: str, source: str = "measured") -> LatencyRow:
        """The row of `engine` and `phase`.

        Raises:
            KeyError: no such row (the rows present are listed).
        """
        for r in self.rows:
            if (r.engine, r.phase, r.source) == (engine, phase, source):
                return r
        have = ", ".join(f"{r.engine}/{r.phase}/{r.source}" for r in self.rows)
        raise KeyError(f"no {source} {phase} row for {engine!r}; rows: {have}")

    def to_dict(self) -> dict:
        return {"kind": "latency", "rows": [dataclasses.asdict(r) for r in self.rows], **self.config.to_dict(),
                "cold_start_detail": [dataclasses.asdict(c) for c in self.cold_start],
                "omp_wait_policy": self.omp_wait_policy, "projection_note": self.projection_note,
                **({"channels": [dataclasses.asdict(r) for r in self.channels],
                    "load_average": list(self.load_average)} if self.channels else {})}


def interleaved_ms(calls: dict, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Time each callable `repeats` times in ms, the callables taking turns, the order rotating each round.

    Rotating matters: a call right after a torch call was measured 0.1-0.2 ms slower here.
    """
    names = list(calls)
    times = {n: [] for n in names}
    for r in range(warmup + repeats):
        turn = r % len(names)
        for name in names[turn:] + names[:turn]:
            start = time.perf_counter()
            calls[name]()
            if r >= warmup:
                times[name].append(1000.0 * (time.perf_counter() - start))
    return times


def summary_ms(samples: list[float]) -> tuple[float, float]:
    q25, q75 = np.percentile(samples, [25, 75])
    return float(statistics.median(samples)), float(q75 - q25)
