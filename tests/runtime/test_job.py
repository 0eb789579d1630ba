"""LearnerSpec and build_learner: the one learner spec behind `edgecl run` and the board agent."""

import dataclasses

import pytest

from edgecl.devices.jobs import DataSpec, TrainSpec
from edgecl.runtime.budget import plan_memory
from edgecl.runtime.job import LearnerSpec, build_learner
from edgecl.runtime.open import open_engine
from edgecl.runtime.scenarios import digits_scenario


@pytest.mark.parametrize("fields, message", [
    ({"method": "ewc"}, "method='ewc'; accepted: finetune, joint, er, derpp"),
    ({"method": "joint"}, r"SparCL \(sparsity=0.75\) runs on er or derpp, not 'joint'"),
    ({"buffer": None}, "method 'derpp' replays examples: give a buffer"),
    ({"buffer": 0}, "buffer=0; accepted: an integer >= 1"),
    ({"buffer": 2.5}, "buffer=2.5; accepted: an integer >= 1"),
    ({"lr": -1.0}, "lr=-1.0; accepted: > 0"),
    ({"batch_size": 1}, "batch_size=1; accepted: >= 2"),
    ({"sparsity": 1.0}, "sparsity"),
    ({"threads": 0}, "threads=0; accepted: an integer >= 1, or None"),
    ({"threads": 1.5}, "threads=1.5; accepted: an integer >= 1, or None"),
    ({"seed": -1}, "seed=-1; accepted: an integer >= 0"),
    ({"seed": 0.5}, "seed=0.5; accepted: an integer >= 0"),
])
def test_bad_specs_are_refused_with_the_value_and_what_is_accepted(fields, message):
    with pytest.raises(ValueError, match=message):
        LearnerSpec(**fields)


def test_fields_are_keywords_only():
    from edgecl.bench.cl_run import JobConfig

    with pytest.raises(TypeError):
        JobConfig("fashion-mnist")  # would otherwise land in `method`
    with pytest.raises(TypeError):
        LearnerSpec("er")


def test_dense_strategies_need_no_buffer():
    assert LearnerSpec(method="finetune", sparsity=None, buffer=None).strategy().uses_buffer is False


def test_host_job_and_board_train_spec_share_the_learner_fields():
    from edgecl.bench.cl_run import JobConfig

    shared = {f.name for f in dataclasses.fields(LearnerSpec)}
    for spec_cls in (JobConfig, TrainSpec):
        assert issubclass(spec_cls, LearnerSpec)
        assert shared <= {f.name for f in dataclasses.fields(spec_cls)}
    host = JobConfig(method="er", sparsity=0.9, dgm=False, buffer=200, epochs=3, seed=4)
    board = TrainSpec(run="r", artifact="a", data=DataSpec("d"), method="er", sparsity=0.9, dgm=False, buffer=200,
                      epochs=3, seed=4)
    assert host.strategy() == board.strategy() and host.run_config() == board.run_config()


@pytest.fixture(scope="module")
def digits():
    return digits_scenario(0)


def test_buffer_by_count(exported, digits):
    _, art = exported("cnn")
    spec = LearnerSpec(buffer=120, seed=3)
    learner, plan, memory_plan = build_learner(open_engine(art, spec.optimizer()), digits, spec)
    assert memory_plan is None and learner.buffer.capacity == 120 and plan["buffer_examples"] == 120
    assert plan["buffer_bytes"] == learner.buffer.nbytes  # what the storage really holds


def test_buffer_from_budget_is_what_the_plan_leaves(exported, digits):
    _, art = exported("cnn")
    spec = LearnerSpec(method="er", buffer=None, budget="2MiB")
    engine = open_engine(art, spec.optimizer())
    learner, plan, memory_plan = build_learner(engine, digits, spec)
    again = plan_memory(engine.manifest, "2MiB", 32, spec.optimizer(), replay_batch_size=32, store_logits=False)
    assert learner.buffer.capacity == memory_plan.replay_capacity == again.replay_capacity > 0
    assert plan == memory_plan.to_dict() and memory_plan.total_bytes <= memory_plan.budget_bytes


def test_a_buffer_larger_than_the_budget_leaves_is_refused_with_the_plan(exported, digits):
    _, art = exported("cnn")
    spec = LearnerSpec(buffer=10**6, budget="2MiB")
    with pytest.raises(ValueError, match=r"buffer=1000000 examples does not fit the budget 2MiB: it leaves room for \d+"):
        build_learner(open_engine(art, spec.optimizer()), digits, spec)
