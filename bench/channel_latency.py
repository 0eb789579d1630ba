"""Training-step time of one channel-structured export at several channel densities, against the dense graph.

One structured export (`structure="channel"`) and one dense export of the same model and weights;
an engine per density opened on the structured folder (its channel sets cut to that share of
their channels, the same random subset for every set size), one on the dense folder. The
engines take turns call by call, the order rotating each round, so a slow spell of a shared
machine lands on all of them alike; medians and the ratio to the dense step are reported with
the load average before and after.

    python -m edgecl.bench.channel_latency cnn-s2 1x28x28 --densities 1 0.75 0.5 0.25
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class ChannelLatency:
    """Median step time (ms) of the dense graph and of the structured one per channel density."""

    model: str
    input_shape: tuple
    batch: int
    threads: int
    repeats: int
    dense_ms: float
    structured_ms: dict  # density -> median ms
    load_average: tuple  # 1-minute load average before and after

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ratio_to_dense"] = {k: v / self.dense_ms for k, v in self.structured_ms.items()}
        return d


def active_channels(sets: dict[str, int], density: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """max(1, round(density * n)) channels of each set, sorted, drawn from `rng`."""
    return {s: np.sort(rng.choice(n, max(1, round(density * n)), replace=False)).astype(np.int64)
            for s, n in sets.items()}


def measure_channel_latency(model: str = "cnn-s2", input_shape=(1, 28, 28), batch: int = 32, threads: int = 2,
                            densities=(1.0, 0.75, 0.5, 0.25), repeats: int = 30, warmup: int = 3, seed: int = 0,
                            model_kwargs=None) -> ChannelLatency:
    """Export `model` twice (dense, structured) and time interleaved training steps (SGD).

    Raises:
        ValueError: a density outside (0, 1], repeats < 3, batch or threads < 1.
    """
    if not all(0 < d <= 1 for d in densities):
        raise ValueError(f"densities={densities!r}; accepted: numbers in (0, 1]")
    if repeats < 3 or batch < 1 or threads < 1:
        raise ValueError(f"repeats={repeats}, batch={batch}, threads={threads}; accepted: repeats >= 3, batch and "
                         "threads >= 1")
    import torch  # exporting needs the host side

    from edgecl.exporters import export
    from edgecl.exporters.models import build_model
    from edgecl.runtime import OptimizerConfig, open_engine

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="edgecl-channel-latency-") as tmp:
        net = build_model(model, input_shape, 10, seed=seed, **(model_kwargs or {}))
        example = torch.randn(4, *input_shape)
        export(net, example, Path(tmp) / "dense")
        export(net, example, Path(tmp) / "structured", structure="channel")
        optimizer = OptimizerConfig("sgd", lr=0.01, momentum=0.9)
        engines = {"dense": open_engine(Path(tmp) / "dense", optimizer, threads=threads)}
        for d in densities:
            eng = open_engine(Path(tmp) / "structured", optimizer, threads=threads)
            eng.set_channels(active_channels(eng.channel_sets, d, rng))
            engines[d] = eng
        x = rng.standard_normal((batch, *input_shape), dtype=np.float32)
        y = rng.integers(0, 10, batch)
        times: dict = {k: [] for k in engines}
        keys = list(engines)
        load_before = os.getloadavg()[0]
        for r in range(warmup + repeats):
            for k in keys[r % len(keys):] + keys[: r % len(keys)]:
                t0 = time.perf_counter()
                engines[k].step(x, y)
                if r >= warmup:
                    times[k].append((time.perf_counter() - t0) * 1e3)
        load_after = os.getloadavg()[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    return ChannelLatency(model, tuple(input_shape), batch, threads, repeats, med.pop("dense"), med,
                          (load_before, load_after))


def format_table(r: ChannelLatency) -> str:
    rows = [f"{r.model} {'x'.join(map(str, r.input_shape))}, batch {r.batch}, {r.threads} threads, {r.repeats} steps "
            f"each, load average {r.load_average[0]:.2f} -> {r.load_average[1]:.2f}",
            f"{'graph':<18}{'median ms':>10}{'vs dense':>10}", f"{'dense':<18}{r.dense_ms:>10.2f}{1:>9.2f}x"]
    for d, ms in r.structured_ms.items():
        rows.append(f"{f'channels {d:g}':<18}{ms:>10.2f}{ms / r.dense_ms:>9.2f}x")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgecl.bench.channel_latency", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a model family (edgecl.exporters.models.MODELS)")
    parser.add_argument("input_shape", help="one sample, e.g. 1x28x28")
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--width", type=int, help="the family's width (e.g. 64 with resnet and blocks 2 2 2 2)")
    parser.add_argument("--blocks", type=int, nargs="+", help="resnet blocks per stage")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in (("width", args.width), ("blocks", args.blocks))
              if v is not None}
    shape = tuple(int(v) for v in args.input_shape.split("x"))
    result = measure_channel_latency(args.model, shape, args.batch, args.threads, tuple(args.densities), args.repeats,
                                     model_kwargs=kwargs)
    print(json.dumps(result.to_dict()) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
