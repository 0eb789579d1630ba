"""Benchmarks of one call of the app-facing online learner: `learn` of 1 and of 8 samples, `predict` of 1.

Each method's learner (`edgecl.bench.online_latency.open_filled`: the buffer of an 8 MiB budget,
filled with 2 replay batches first, so every step replays full batches) on the small CNN at 8x8
(the tests' fixture) and 28x28 (Fashion-MNIST), and DER++ / SparCL-DER++ 0.75 on the real-size
CIFAR-10 nets, ResNet-18 and MobileNetV2 at 3x32x32 (REAL_SIZE: fewer rounds, a DER++ step of
1 + 64 samples takes seconds); random inputs, 2 threads. The learners keep learning while timed,
so DGM's periodic gradient-mask recomputation is in the rounds. `bench online` measures the same
calls with the methods taking turns.

The normal test run skips them (pyproject: `--benchmark-skip`, which skips at collection, before
any export). To measure:

    OMP_WAIT_POLICY=PASSIVE pytest tests/bench/test_online_benchmark.py --benchmark-only -p no:logging \\
        --benchmark-columns=median,iqr,min,rounds --benchmark-sort=name
"""

from __future__ import annotations

import os
import sys

if "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # libgomp reads it once, when torch loads it (the export)
OMP_POLICY = os.environ.get("OMP_WAIT_POLICY", "libgomp default (torch was loaded before this module)")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

THREADS = 2
ROUNDS, WARMUP = 100, 5
SMALL_METHODS = ("finetune", "er", "derpp", "sparcl-derpp")
REAL_METHODS = ("derpp", "sparcl-derpp")
REAL_SIZE = {"resnet18": (3, 32, 32), "mobilenetv2": (3, 32, 32)}  # model -> input; 10 rounds, 1 warm-up
CALLS = (("learn", 1), ("learn", 8), ("predict", 1))
CASES = ([("cnn", (1, 8, 8), m) for m in SMALL_METHODS] + [("cnn", (1, 28, 28), m) for m in SMALL_METHODS]
         + [(model, shape, m) for model, shape in REAL_SIZE.items() for m in REAL_METHODS])


def _id(case) -> str:
    model, shape, method = case
    return f"{model}-{'x'.join(map(str, shape))}-{method}"


@pytest.fixture(scope="module")
def folders(exported, tmp_path_factory):
    """(model, input shape) -> an artifact folder, each exported once (the 8x8 CNN: the tests' fixture)."""
    pytest.importorskip("torch", reason="exporting needs torch (host side)")
    from edgecl.bench.export_cache import export_cached

    cache = {("cnn", (1, 8, 8)): exported("cnn")[1]}
    out = tmp_path_factory.mktemp("online-exports")

    def get(model, shape):
        if (model, shape) not in cache:
            cache[(model, shape)] = export_cached(model, shape, 10, 0, out)[1]
        return cache[(model, shape)]

    return get


@pytest.mark.parametrize("kind, n", CALLS, ids=[f"{k}{n}" for k, n in CALLS])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_online_call(benchmark, folders, tmp_path, case, kind, n):
    from edgecl.bench.online_latency import OnlineLatencyConfig, call, open_filled, random_samples

    model, shape, method = case
    config = OnlineLatencyConfig(methods=(method,), threads=THREADS)
    learner = open_filled(folders(model, shape), tmp_path / "state", method, config)
    rng = np.random.default_rng(0)
    x, y = random_samples(n, shape, 10, rng)
    rounds, warmup = (10, 1) if model in REAL_SIZE else (ROUNDS, WARMUP)
    benchmark.group = f"{model} {'x'.join(map(str, shape))} {kind}({n})"
    benchmark.name = method
    benchmark.extra_info.update(method=method, call=f"{kind}({n})", threads=THREADS, omp_wait_policy=OMP_POLICY,
                                buffer=0 if learner.buffer is None else learner.buffer.capacity)
    try:
        seen, steps = learner.samples_seen, learner.learner.step
        out = benchmark.pedantic(call, args=(learner, kind, x, y), rounds=rounds, warmup_rounds=warmup, iterations=1)
        calls = rounds + warmup
        if kind == "learn":
            assert np.isfinite(out) and learner.samples_seen == seen + calls * n and learner.learner.step == steps + calls
            if learner.buffer is not None:
                assert len(learner.buffer) == min(learner.buffer.capacity, learner.samples_seen)
        else:
            assert out.shape == (n,) and out.dtype == np.int64 and 0 <= out.min() and out.max() < 10
            assert learner.samples_seen == seen and learner.learner.step == steps  # predict never trains
    finally:
        learner.close()
