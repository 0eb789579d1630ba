"""FLOPs counted by the Learner follow the masks it really applies (weight mask and DGM mask)."""

from __future__ import annotations

import numpy as np
import pytest

from edgecl.runtime import open_engine
from edgecl.runtime.flops import dense_training_flops, training_flops
from edgecl.runtime.optim import OptimizerConfig
from edgecl.runtime.strategies import Learner, SparCLConfig, StrategyConfig


def _steps(learner, n_steps, rng):
    learner.begin_task(0, 64)
    learner.begin_epoch(0, 10)
    for _ in range(n_steps):
        idx = rng.integers(0, 64, 16)
        x = rng.standard_normal((16, 1, 8, 8)).astype(np.float32)
        learner.observe(x, rng.integers(0, 10, 16), idx)


@pytest.mark.parametrize("sparsity", [0.75, 0.9])
def test_weight_gradient_work_counts_only_active_and_kept_entries(exported, sparsity):
    _, folder = exported("cnn")
    engine = open_engine(folder, OptimizerConfig("sgd", lr=0.05), threads=1)
    config = StrategyConfig("finetune", sparcl=SparCLConfig(sparsity=sparsity, ddr=False))
    learner = Learner(engine, config, None, np.random.default_rng(0))
    _steps(learner, 31, np.random.default_rng(1))  # DGM masks recomputed at steps 0 and 30

    masks = engine.masks()
    kept = {n: float(np.mean((masks[n] != 0) & (learner.dgm.masks[n] != 0))) for n in learner.sparse_names}
    for n, density in kept.items():
        # the mask is inside the graph: masked entries have gradient 0, so DGM's top 20 % of the
        # tensor holds at most the active entries (density 1 - sparsity) and never more than 20 %
        assert 0 < density <= min(1.0 - sparsity, 0.2) + 1.0 / masks[n].size  # counts round up
        assert (learner.last_grads[n][masks[n] == 0] == 0).all()
    weight_density = {n: float(masks[n].mean()) for n in learner.sparse_names}
    expected = training_flops(learner.layers, 1, weight_density, kept).total
    assert learner._flops_per_sample == pytest.approx(expected)
    dense = dense_training_flops(learner.layers, 1).total
    assert learner._dense_flops_per_sample == pytest.approx(dense)
    assert learner.train_flops == pytest.approx(31 * 16 * expected, rel=0.2)  # last refresh at step 30
    assert learner.train_flops < learner.dense_train_flops


def test_without_dgm_weight_gradient_work_follows_the_weight_mask(exported):
    _, folder = exported("cnn")
    engine = open_engine(folder, OptimizerConfig("sgd", lr=0.05), threads=1)
    config = StrategyConfig("finetune", sparcl=SparCLConfig(sparsity=0.75, dgm=False, ddr=False))
    learner = Learner(engine, config, None, np.random.default_rng(0))
    _steps(learner, 2, np.random.default_rng(1))
    masks = engine.masks()
    weight_density = {n: float(masks[n].mean()) for n in learner.sparse_names}
    rows = training_flops(learner.layers, 1, weight_density, weight_density).layers
    assert learner._flops_per_sample == pytest.approx(sum(r.total for r in rows))
    by_name = {r.weight: r for r in rows}
    for n in learner.sparse_names:  # forward, input-grad and weight-grad all at the weight density
        assert by_name[n].weight_grad == pytest.approx(by_name[n].forward)


def test_per_sample_flops_always_follow_the_current_masks_across_a_task_boundary(exported):
    """At a task's first step DGM recomputes its (reset) masks off the 30-step grid: the count must
    follow then too, or a run resumed from a checkpoint in that window counts differently (found
    by the SIGKILL test of `edgecl run`)."""
    _, folder = exported("cnn")
    engine = open_engine(folder, OptimizerConfig("sgd", lr=0.05), threads=1)
    config = StrategyConfig("finetune", sparcl=SparCLConfig(sparsity=0.75, ddr=False))
    learner = Learner(engine, config, None, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    for task, n_steps in ((0, 7), (1, 5)):  # task 1 starts at step 7: not a multiple of 30
        learner.begin_task(task, 64)
        learner.begin_epoch(0, 10)
        for _ in range(n_steps):
            x = rng.standard_normal((16, 1, 8, 8)).astype(np.float32)
            learner.observe(x, rng.integers(0, 10, 16), rng.integers(0, 64, 16))
            counted = learner._flops_per_sample
            learner._refresh_flops()  # what a learner restored from a checkpoint here would count
            assert counted == learner._flops_per_sample, (task, learner.step)
