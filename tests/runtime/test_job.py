"""LearnerSpec and build_learner: the one learner spec behind `edgecl run` and the board agent."""

import dataclasses

import pytest

from edgecl.devices.jobs import DataSpec, TrainSpec
from edgecl.runtime.budget import plan_memory
from edgecl.runtime.job import LearnerSpec, build_learner, check_memory
from edgecl.runtime.memory import MachineMemory
from edgecl.runtime.open import open_engine
from edgecl.runtime.scenarios import digits_scenario


@pytest.mark.parametrize("fields, message", [
    ({"method": "ewc"}, "method='ewc'; accepted: finetune, joint, er, derpp"),
    ({"method": "joint"}, r"SparCL \(sparsity=0.75\) runs on er or derpp, not 'joint'"),
    ({"buffer": None}, "method 'derpp' replays examples: give a buffer"),
    ({"buffer": 0}, "buffer=0; accepted: an integer >= 1"),
    ({"buffer": 2.5}, "buffer=2.5; accepted: an integer >= 1"),
    ({"lr": -1.0}, "lr=-1.0; accepted: > 0"),
    ({"batch_size": 1}, "batch_size=1; accepted: an integer >= 2"),
    ({"batch_size": 0}, "batch_size=0; accepted: an integer >= 2"),  # not replay_batch: --batch is batch_size
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


SMALL_MACHINE = MachineMemory(total_bytes=2 * 2**30, available_bytes=2**30)


@pytest.mark.parametrize("fields, message", [
    ({"budget": "10 TiB", "buffer": None}, r"budget='10 TiB' is 10,995,116,277,760 B \(10.00 TiB\), more than this "
                                           r"machine has: 1.00 GiB available of 2.00 GiB total; accepted: budget <= "
                                           r"1,073,741,824 B"),
    ({"budget": "10 TiB", "buffer": 10}, r"budget='10 TiB' is"),  # a promise the device cannot keep, buffer or not
    ({"budget": "1.5GiB", "buffer": None}, r"budget='1.5GiB' is 1,610,612,736 B"),  # under the total, over available
    ({"buffer": 10**7}, r"buffer=10000000 examples \(306 B each\) is 3,060,000,000 B \(2.85 GiB\), more than this "
                        r"machine has: 1.00 GiB available of 2.00 GiB total; accepted: buffer <= 3,508,960 examples"),
    ({"method": "er", "buffer": 10**7}, r"buffer=10000000 examples \(266 B each\)"),  # ER keeps no logits
])
def test_check_memory_refuses_a_budget_or_buffer_the_machine_cannot_hold(fields, message):
    spec = LearnerSpec(**fields)
    with pytest.raises(ValueError, match=message):
        check_memory(spec, (1, 8, 8), 10, SMALL_MACHINE)


def test_check_memory_lets_what_fits_pass_and_ignores_the_buffer_of_a_dense_finetune():
    check_memory(LearnerSpec(budget="512MiB", buffer=None), (1, 8, 8), 10, SMALL_MACHINE)
    check_memory(LearnerSpec(buffer=3_508_960), (1, 8, 8), 10, SMALL_MACHINE)
    check_memory(LearnerSpec(method="finetune", sparsity=None, buffer=10**9), (1, 8, 8), 10, SMALL_MACHINE)


def test_build_learner_refuses_a_huge_buffer_or_budget_before_allocating(exported, digits):
    _, art = exported("cnn")
    engine = open_engine(art, LearnerSpec().optimizer())
    with pytest.raises(ValueError, match=r"buffer=1000000000000 examples \(306 B each\) is 306,000,000,000,000 B"):
        build_learner(engine, digits, LearnerSpec(buffer=10**12))
    with pytest.raises(ValueError, match=r"budget='10 TiB' is 10,995,116,277,760 B \(10.00 TiB\), more than this "
                                         r"machine has"):
        build_learner(engine, digits, LearnerSpec(buffer=None, budget="10 TiB"))
