"""Benchmarks of the runtime's numpy hot paths around a training step, each checked for correctness.

Sizes are those of the Fashion-MNIST runs: the small CNN at 28x28 (conv 16x1x3x3,
conv 32x16x3x3, linear 64x1568, linear 10x64), batch 32, a 500-example DER++ buffer.

- TDM mask update (`prune_and_regrow` over every weight, 0.75 sparsity, 4 % pruned),
- top-k mask (`topk_mask`, the largest layer), DGM top-k (`gradient_topk_mask` over every
  gradient, 20 % kept) and a DGM step that reuses its masks (`DGM.apply` between recomputations),
- replay buffer insert (a full reservoir, batch 32) and sample (32 of 500).

The normal test run skips them (`--benchmark-skip`). Measure, save and compare:

    pytest tests/bench --benchmark-only --benchmark-storage=file://bench/baselines --benchmark-save=baseline
    pytest tests/bench --benchmark-only --benchmark-storage=file://bench/baselines \\
        --benchmark-compare=0001 --benchmark-compare-fail=median:25%
"""

from __future__ import annotations

import numpy as np
import pytest

from edgecl.runtime.buffer import ReplayBuffer
from edgecl.runtime.sparcl import DGM, gradient_topk_mask, keep_count, prune_and_regrow, topk_mask

SHAPES = {"0.weight": (16, 1, 3, 3), "3.weight": (32, 16, 3, 3), "7.weight": (64, 1568), "9.weight": (10, 64)}
DENSITY = 0.25  # TDM at 0.75 sparsity
PRUNE_RATIO = 0.04
DGM_DENSITY = 0.2
BATCH = 32
CAPACITY = 500
SAMPLE = (1, 28, 28)


def _layers(seed: int = 0):
    """Weights, gradients and 0.75-sparse masks of the small CNN (random, fixed seed)."""
    rng = np.random.default_rng(seed)
    weights = {n: rng.standard_normal(s, dtype=np.float32) for n, s in SHAPES.items()}
    grads = {n: rng.standard_normal(s, dtype=np.float32) for n, s in SHAPES.items()}
    masks = {n: topk_mask(np.abs(w), DENSITY) for n, w in weights.items()}
    return weights, grads, masks


def test_tdm_mask_update(benchmark):
    weights, grads, masks = _layers()
    rng = np.random.default_rng(1)

    def update():
        return {n: prune_and_regrow(weights[n] * masks[n], grads[n], masks[n], DENSITY, PRUNE_RATIO, rng)
                for n in SHAPES}

    new = benchmark(update)
    for n, m in new.items():
        assert set(np.unique(m)) <= {0.0, 1.0} and m.sum() == keep_count(m.size, DENSITY)
        kept = (m == 1) & (masks[n] == 1)
        # the most important active weights survive; the rest of the target is regrown from old zeros
        assert kept.sum() == int(np.floor(keep_count(m.size, DENSITY) * (1 - PRUNE_RATIO) + 1e-9))


def test_topk_mask_largest_layer(benchmark):
    scores = np.abs(_layers()[0]["7.weight"])
    mask = benchmark(topk_mask, scores, DENSITY)
    assert mask.sum() == keep_count(scores.size, DENSITY)
    assert scores[mask == 1].min() >= scores[mask == 0].max()


def test_dgm_topk_every_gradient(benchmark):
    grads = _layers()[1]
    masks = benchmark(lambda: {n: gradient_topk_mask(g, DGM_DENSITY) for n, g in grads.items()})
    for n, m in masks.items():
        g = np.abs(grads[n])
        assert m.sum() == keep_count(g.size, DGM_DENSITY)
        assert g[m == 1].min() >= g[m == 0].max()


def test_dgm_step_reusing_masks(benchmark):
    grads = _layers()[1]
    dgm = DGM(DGM_DENSITY, every=30)
    dgm.apply(0, grads)  # masks computed at step 0, reused until step 30
    out = benchmark(dgm.apply, 1, grads)
    for n, g in out.items():
        assert g.dtype == np.float32 and np.array_equal(g, grads[n] * dgm.masks[n])
        assert np.count_nonzero(g) == keep_count(g.size, DGM_DENSITY)


def _full_buffer(seed: int = 0) -> ReplayBuffer:
    rng = np.random.default_rng(seed)
    buf = ReplayBuffer(CAPACITY, SAMPLE, 10, np.random.default_rng(seed))
    for _ in range(2 * CAPACITY // BATCH):
        buf.add(rng.random((BATCH, *SAMPLE), dtype=np.float32), rng.integers(0, 10, BATCH),
                rng.standard_normal((BATCH, 10), dtype=np.float32), task=0)
    return buf


def test_buffer_insert_into_full_reservoir(benchmark):
    buf = _full_buffer()
    rng = np.random.default_rng(1)
    x = rng.random((BATCH, *SAMPLE), dtype=np.float32)
    y = rng.integers(0, 10, BATCH)
    logits = rng.standard_normal((BATCH, 10), dtype=np.float32)
    seen = buf.seen
    benchmark(buf.add, x, y, logits, task=1)
    calls = (buf.seen - seen) // BATCH
    assert calls >= 1 and buf.seen == seen + calls * BATCH and len(buf) == CAPACITY
    stored = buf.task == 1  # every kept example of the offered batch is stored whole
    for slot in np.flatnonzero(stored):
        (row,) = np.flatnonzero((x == buf.x[slot]).all(axis=(1, 2, 3)))
        assert buf.y[slot] == y[row] and np.array_equal(buf.logits[slot], logits[row])


def test_buffer_sample(benchmark):
    buf = _full_buffer()
    rng = np.random.default_rng(2)
    x, y, logits, task, idx = benchmark(buf.sample, BATCH, rng)
    assert x.shape == (BATCH, *SAMPLE) and len(np.unique(idx)) == BATCH
    assert np.array_equal(x, buf.x[idx]) and np.array_equal(y, buf.y[idx]) and np.array_equal(logits, buf.logits[idx])


@pytest.mark.parametrize("n", [0, CAPACITY])
def test_buffer_sample_edges_without_timing(n):
    """Not a benchmark: the sample sizes at the edges (runs in the normal test run)."""
    x, y, logits, task, idx = _full_buffer().sample(n, np.random.default_rng(0))
    assert len(x) == len(y) == len(idx) == n and len(np.unique(idx)) == n
