"""Benchmarks of one training step, `engine.step(x, y)`: torch eager vs portable vs ort-training.

Batch 32, 2 threads, SGD; the small CNN and the MLP at 8x8 (digits: so small that
per-call overheads dominate) and 28x28 (Fashion-MNIST); dense, plus the CNN with
90 %-sparse masks (the mask handling SparCL adds; the kernels stay dense); the small
ResNet and the MobileNet-style net at 8x8; and the real-size CIFAR-10 nets, ResNet-18
and MobileNetV2 at 3x32x32 (REAL_SIZE: fewer rounds, a step takes 0.1-2 s). Each model
and input size is one pytest-benchmark group, so the engines print side by side. `bench latency` measures
the same steps with the engines taking turns, plus inference and cold start.

The normal test run skips them (pyproject: `--benchmark-skip`, which skips at
collection, before any export). To measure:

    OMP_WAIT_POLICY=PASSIVE pytest tests/bench --benchmark-only -p no:logging \\
        --benchmark-columns=median,iqr,min,rounds --benchmark-sort=name --benchmark-json=step.json
    python -m tests.bench.test_step_benchmark step.json   # median table with ratios to torch eager
    python -m tests.bench.test_step_benchmark --interleaved   # the same, engines taking turns (busy machine)

Baseline and comparison (with tests/bench/test_hotpaths_benchmark.py):

    pytest tests/bench --benchmark-only --benchmark-storage=file://bench/baselines --benchmark-save=baseline
    pytest tests/bench --benchmark-only --benchmark-storage=file://bench/baselines \\
        --benchmark-compare=0001 --benchmark-compare-fail=median:25%

OMP_WAIT_POLICY=PASSIVE (set below if unset, before torch loads its OpenMP runtime):
torch's OpenMP threads then sleep between parallel regions, as ONNX Runtime's threads
do here (edgecl.runtime.session: no spinning), so no engine's idle threads steal the
other core from the one being measured. It is not free for torch: waking a sleeping
thread costs every parallel op some microseconds, so on an idle machine torch eager is
slower under PASSIVE than with libgomp's default spinning (on a busy one spinning is far
worse); `extra_info` records the policy. Timings on a shared 2-core machine are noisy:
compare ratios within one run, and re-run.
"""

from __future__ import annotations

import json
import os
import sys

if "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # libgomp reads it once, when torch loads it
OMP_POLICY = os.environ.get("OMP_WAIT_POLICY", "libgomp default (torch was loaded before this module)")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

BATCH = 32
THREADS = 2
ROUNDS = 200
WARMUP = 20
ENGINES = ("torch", "portable", "ort-training")
CASES = [  # (model, input size, masked)
    ("mlp", 8, False), ("mlp", 28, False), ("cnn", 8, False), ("cnn", 8, True), ("cnn", 28, False),
    ("cnn", 28, True), ("resnet", 8, False), ("mobilenet", 8, False), ("resnet18", 32, False),
    ("mobilenetv2", 32, False),
]
DENSITY = 0.1  # of the masked variant (SparCL's 90 % sparsity)
# CIFAR-10 inputs (3 channels); a ResNet-18 step is ~1-2 s here, so 15 timed rounds (the medians of 15)
REAL_SIZE = {"resnet18": (3, 15, 2), "mobilenetv2": (3, 15, 2)}  # model -> (channels, rounds, warm-up rounds)


def _shape(model: str, hw: int) -> tuple[int, int, int]:
    return (REAL_SIZE.get(model, (1,))[0], hw, hw)


def _rounds(model: str) -> tuple[int, int]:
    return REAL_SIZE[model][1:] if model in REAL_SIZE else (ROUNDS, WARMUP)


def _group(model: str, hw: int, masked: bool) -> str:
    return f"{model} {hw}x{hw} {'masked' if masked else 'dense'}"


def _exporter(folder_for):
    """(model, hw, engine, masked) -> (torch model, artifact folder), each exported once."""
    import torch

    from edgecl.exporters import export
    from edgecl.exporters.models import build_model

    cache = {}

    def get(model: str, hw: int, engine: str, masked: bool):
        key = (model, hw, engine, masked)
        if key not in cache:
            net = build_model(model, in_shape=_shape(model, hw), num_classes=10, seed=0)
            folder = folder_for(f"{model}{hw}-{engine}-{'masked' if masked else 'dense'}")
            export(net, torch.randn(4, *_shape(model, hw)), folder, engine=engine, masks="weights" if masked else None)
            cache[key] = (net, folder)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    pytest.importorskip("torch", reason="exporting needs torch (host side)")
    return _exporter(lambda name: tmp_path_factory.mktemp(name) / "art")


def _setup(artifacts, model: str, hw: int, masked: bool, engine: str):
    """An engine with 2 threads (the same random masks in every engine if masked) and one batch."""
    from edgecl.runtime import open_engine

    if engine == "torch":
        from edgecl.exporters.reference import TorchEngine

        net, folder = artifacts(model, hw, "portable", masked)
        eng = TorchEngine.from_artifacts(net, folder, threads=THREADS)
    else:
        eng = open_engine(artifacts(model, hw, engine, masked)[1], threads=THREADS)
    rng = np.random.default_rng(0)
    if masked:
        eng.set_masks({n: (rng.random(s) < DENSITY).astype(np.float32) for n, s in eng.mask_shapes.items()})
    x = rng.standard_normal((BATCH, *_shape(model, hw)), dtype=np.float32)
    return eng, x, rng.integers(0, 10, BATCH)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", CASES, ids=[_group(*c).replace(" ", "-") for c in CASES])
def test_step(benchmark, artifacts, case, engine):
    eng, x, y = _setup(artifacts, *case, engine)
    first = eng.step(x, y)
    benchmark.group = _group(*case)
    benchmark.name = engine
    benchmark.extra_info.update(engine=engine, batch=BATCH, threads=THREADS, omp_wait_policy=OMP_POLICY)
    rounds, warmup = _rounds(case[0])
    benchmark.pedantic(eng.step, args=(x, y), rounds=rounds, warmup_rounds=warmup, iterations=1)
    last = eng.step(x, y)
    assert np.isfinite(last) and last < first, f"{engine}: loss {first} -> {last}; the steps did not train"


def _table(medians: dict[str, dict[str, float]]) -> str:
    lines = ["| model | " + " | ".join(f"{e} median ms (x torch)" for e in ENGINES) + " |",
             "| --- |" + " --- |" * len(ENGINES)]
    for group in [_group(*c) for c in CASES]:
        row = medians.get(group, {})
        base = row.get("torch")
        cells = [f"{row[e] * 1e3:.3f} ({row[e] / base:.2f})" if e in row and base else "-" for e in ENGINES]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_table(json_path: str) -> str:
    """Median step time per engine and its ratio to torch eager, per group, from --benchmark-json."""
    with open(json_path) as f:
        results = json.load(f)["benchmarks"]
    medians: dict[str, dict[str, float]] = {}
    for r in results:
        medians.setdefault(r["group"], {})[r["extra_info"]["engine"]] = r["stats"]["median"]
    return _table(medians)


def interleaved_table(rounds: int | None = None) -> str:
    """The same steps, the engines of a group taking turns round by round.

    pytest-benchmark times one engine after the other; when another process takes a core
    for a while, that lands on whichever engine is running. Taking turns spreads it evenly,
    so the ratios hold on a busy machine (the absolute times still move). The order rotates
    every round: a step right after a torch step was measured 0.1-0.2 ms slower. `rounds`:
    per case (default ROUNDS, REAL_SIZE's for those).
    """
    import tempfile
    import time
    from pathlib import Path

    medians = {}
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = _exporter(lambda name: Path(tmp) / name)
        for case in CASES:
            setups = {e: _setup(artifacts, *case, e) for e in ENGINES}
            times = {e: [] for e in ENGINES}
            timed, warmup = _rounds(case[0])
            timed = timed if rounds is None else rounds
            for r in range(warmup + timed):
                turn = r % len(ENGINES)
                for e in ENGINES[turn:] + ENGINES[:turn]:  # rotated: the step after a torch step runs slower
                    eng, x, y = setups[e]
                    start = time.perf_counter()
                    eng.step(x, y)
                    if r >= warmup:
                        times[e].append(time.perf_counter() - start)
            medians[_group(*case)] = {e: float(np.median(t)) for e, t in times.items()}
    return _table(medians)


if __name__ == "__main__":  # python -m tests.bench.test_step_benchmark (step.json | --interleaved [rounds])
    if sys.argv[1] == "--interleaved":
        print(f"OMP_WAIT_POLICY={OMP_POLICY}, batch {BATCH}, {THREADS} threads")
        print(interleaved_table(*map(int, sys.argv[2:3])))
    else:
        print(ratio_table(sys.argv[1]))
