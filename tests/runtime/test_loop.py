"""The continual-learning loop and strategies, on Split Digits with the portable engine."""

from __future__ import annotations

import numpy as np
import pytest

from edgecl.runtime import open_engine
from edgecl.runtime.buffer import ReplayBuffer
from edgecl.runtime.loop import RunConfig, epoch_order, run_scenario
from edgecl.runtime.metrics import average_accuracy, backward_transfer, forgetting
from edgecl.runtime.optim import OptimizerConfig
from edgecl.runtime.scenarios import digits_scenario
from edgecl.runtime.strategies import Learner, SparCLConfig, StrategyConfig


@pytest.fixture(scope="module")
def scenario():
    return digits_scenario(seed=0)


def _learner(exported, strategy, capacity=100, seed=0):
    _, folder = exported("cnn")
    engine = open_engine(folder, OptimizerConfig("sgd", lr=0.05), threads=1)
    buffer = (ReplayBuffer(capacity, (1, 8, 8), 10, np.random.default_rng(seed),
                           store_logits=strategy.method.value == "derpp") if strategy.uses_buffer else None)
    return Learner(engine, strategy, buffer, np.random.default_rng(seed))


def test_der_plus_plus_beats_fine_tuning_and_metrics_are_consistent(exported, scenario):
    config = RunConfig(epochs=4, batch_size=32)
    fine = run_scenario(scenario, _learner(exported, StrategyConfig("finetune")), config, progress=False)
    derpp = run_scenario(scenario, _learner(exported, StrategyConfig("derpp")), config, progress=False)
    r = np.array(derpp.acc_matrix)
    assert r.shape == (5, 5) and not np.isnan(r).any()
    assert derpp.acc == pytest.approx(average_accuracy(r))
    assert derpp.bwt == pytest.approx(backward_transfer(r))
    assert derpp.forgetting == pytest.approx(forgetting(r))
    assert fine.acc < 0.3  # class-IL fine-tuning forgets the old classes
    assert derpp.acc > fine.acc + 0.2
    assert fine.train_flops == fine.dense_train_flops > 0


def test_sparcl_keeps_exact_sparsity_and_counts_fewer_flops(exported, scenario):
    learner = _learner(exported, StrategyConfig("er", sparcl=SparCLConfig(sparsity=0.75)))
    result = run_scenario(scenario, learner, RunConfig(epochs=10, batch_size=32), progress=False)
    masks = learner.engine.masks()
    params = learner.engine.parameters()
    assert learner.sparse_names
    for name in learner.sparse_names:
        assert masks[name].mean() == pytest.approx(0.25, abs=1 / masks[name].size)
        assert (params[name][masks[name] == 0] == 0).all()
    for name in set(masks) - set(learner.sparse_names):  # stem and classifier stay dense
        assert masks[name].all()
    assert result.dense_train_flops / result.train_flops > 2.5
    assert not learner.active.all() and learner.active.mean() >= 0.7 - 1e-9  # DDR removed at most 30 %
    assert len(learner.buffer) <= learner.buffer.capacity


def test_epoch_order_is_a_pure_function_of_seed_task_epoch():
    active = np.array([True, False, True, True, True])
    a = epoch_order(3, 1, 2, active)
    assert np.array_equal(a, epoch_order(3, 1, 2, active))
    assert sorted(a) == [0, 2, 3, 4]
    assert not np.array_equal(a, epoch_order(3, 1, 3, active)) or len(a) < 3


def test_bad_run_config():
    with pytest.raises(ValueError, match="epochs=0"):
        RunConfig(epochs=0)
    with pytest.raises(ValueError, match="batch_size=1"):
        RunConfig(batch_size=1)
    with pytest.raises(ValueError, match="method='ewc'"):
        StrategyConfig("ewc")
    with pytest.raises(ValueError, match="sparsity=1.0"):
        SparCLConfig(sparsity=1.0)


def test_permuted_digits_is_domain_incremental(exported):
    from edgecl.runtime.data import load_digits
    from edgecl.runtime.scenarios import permuted_scenario, train_test_split

    train, test = train_test_split(load_digits(), 0.2, 0)
    scenario = permuted_scenario(train, test, n_tasks=3, seed=0)
    result = run_scenario(scenario, _learner(exported, StrategyConfig("er")), RunConfig(epochs=6), progress=False)
    r = np.array(result.acc_matrix)
    assert r.shape == (3, 3)
    assert result.task_il_matrix == result.acc_matrix  # every task has all ten classes
    assert r[2, 2] > 0.5  # it learns the latest permutation


@pytest.mark.torch
def test_torch_reference_counts_the_same_flops(exported, scenario):
    from edgecl.exporters.reference import TorchEngine

    model, folder = exported("cnn")
    strategy = StrategyConfig("er", sparcl=SparCLConfig(sparsity=0.75))
    ref = TorchEngine.from_artifacts(model, folder, OptimizerConfig("sgd", lr=0.05), threads=1)
    learner = Learner(ref, strategy, ReplayBuffer(100, (1, 8, 8), 10, np.random.default_rng(0), store_logits=False),
                      np.random.default_rng(0))
    portable = _learner(exported, strategy)
    assert learner._flops_per_sample == portable._flops_per_sample > 0
