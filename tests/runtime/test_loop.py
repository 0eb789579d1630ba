"""The continual-learning loop and strategies, on Split Digits with the portable engine."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from edgecl.runtime import open_engine
from edgecl.runtime.buffer import ReplayBuffer
from edgecl.runtime.loop import RunConfig, epoch_order, run_scenario
from edgecl.runtime.metrics import average_accuracy, backward_transfer, forgetting
from edgecl.runtime.optim import OptimizerConfig
from edgecl.runtime.scenarios import digits_scenario
from edgecl.runtime.strategies import Learner, SparCLConfig, StrategyConfig
from tests.helpers import Killed, dying


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


# --- checkpoints: a resume continues the very run, or is refused --------------------------------

TINY = RunConfig(epochs=2, batch_size=32, seed=0, checkpoint_every=4)
TINY_STRATEGY = StrategyConfig("er", sparcl=SparCLConfig(sparsity=0.75))


DyingLearner = dying(Learner)


@pytest.fixture(scope="module")
def tiny():
    """The first two tasks of Split Digits: 36 steps of two epochs."""
    from edgecl.runtime.scenarios import Scenario

    full = digits_scenario(seed=0)
    return Scenario("split-digits-2", full.tasks[:2], full.num_classes, full.kind)


def tiny_learner(exported, strategy=TINY_STRATEGY, lr=0.05, capacity=100, cls=Learner, die_at_step=None):
    _, folder = exported("cnn")
    engine = open_engine(folder, OptimizerConfig("sgd", lr=lr), threads=1)
    learner = cls(engine, strategy, ReplayBuffer(capacity, (1, 8, 8), 10, np.random.default_rng([0, 1]),
                                                 store_logits=False), np.random.default_rng(0))
    learner.die_at_step = die_at_step
    return learner


@pytest.fixture(scope="module")
def tiny_plain(exported, tiny):
    return run_scenario(tiny, tiny_learner(exported), TINY, progress=False)


def interrupted(exported, tiny, root, step=22, extra_config=None):
    """A checkpoint folder of a run killed before step `step` (checkpoints every 4 steps and at task ends)."""
    with pytest.raises(Killed):
        run_scenario(tiny, tiny_learner(exported, cls=DyingLearner, die_at_step=step), TINY, root, progress=False,
                     extra_config=extra_config)
    return root


def same_run(a, b) -> None:
    for key in ("acc_matrix", "task_il_matrix", "acc", "bwt", "fwt", "train_flops", "dense_train_flops", "steps"):
        assert getattr(a, key) == getattr(b, key), key


def snapshot(root) -> dict:
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*"))
            if p.is_file()}


def latest(root):
    return root / (root / "LATEST").read_text().strip()


def test_a_resumed_run_ends_with_the_uninterrupted_metrics(exported, tiny, tiny_plain, tmp_path):
    root = interrupted(exported, tiny, tmp_path / "ck")
    again = run_scenario(tiny, tiny_learner(exported), TINY, root, progress=False)
    assert again.resumed
    same_run(again, tiny_plain)


@pytest.mark.parametrize("change, field", [
    (dict(config=RunConfig(epochs=3, checkpoint_every=4)), "run.epochs: 2 in the checkpoint, 3 now"),
    (dict(config=RunConfig(epochs=2, seed=1, checkpoint_every=4)), "run.seed: 0 in the checkpoint, 1 now"),
    (dict(config=RunConfig(epochs=2, batch_size=16, checkpoint_every=4)), "run.batch_size: 32 in the checkpoint, 16 now"),
    (dict(lr=0.01), "engine.optimizer.lr: 0.05 in the checkpoint, 0.01 now"),
    (dict(strategy=StrategyConfig("er", sparcl=SparCLConfig(sparsity=0.9))),
     "strategy.sparcl.sparsity: 0.75 in the checkpoint, 0.9 now"),
    (dict(strategy=StrategyConfig("er")), "strategy.sparcl.sparsity: 0.75 in the checkpoint, (absent) now"),
    (dict(capacity=50), "buffer.capacity: 100 in the checkpoint, 50 now"),
    (dict(extra_config={"job": {"lr": 0.05, "threads": 2}}), "threads: 1 in the checkpoint, 2 now"),
])
def test_a_resume_under_other_settings_is_refused_naming_each_field_and_changes_nothing(exported, tiny, tmp_path,
                                                                                      change, field):
    from edgecl.runtime.errors import ConfigMismatchError

    root = interrupted(exported, tiny, tmp_path / "ck", extra_config={"job": {"lr": 0.05, "threads": 1}})
    before = snapshot(root)
    learner = tiny_learner(exported, **{k: v for k, v in change.items() if k in ("strategy", "lr", "capacity")})
    weights = learner.engine.parameters()
    with pytest.raises(ConfigMismatchError, match="was written by a run with other settings") as info:
        run_scenario(tiny, learner, change.get("config", TINY), root, progress=False,
                     extra_config=change.get("extra_config", {"job": {"lr": 0.05, "threads": 1}}))
    assert field in str(info.value) and field in info.value.differences
    assert snapshot(root) == before
    assert learner.step == 0 and all(np.array_equal(w, weights[n]) for n, w in learner.engine.parameters().items())


def test_other_data_under_the_same_name_is_refused(exported, tiny, tmp_path):
    from edgecl.runtime.errors import ConfigMismatchError
    from edgecl.runtime.scenarios import Scenario, Task

    root = interrupted(exported, tiny, tmp_path / "ck")
    first = tiny.tasks[0]
    x = first.x_train.copy()
    x[0, 0, 0, 0] += 1.0
    changed = Scenario(tiny.name, (Task(0, first.classes, x, first.y_train, first.x_test, first.y_test),
                                   tiny.tasks[1]), tiny.num_classes, tiny.kind)
    with pytest.raises(ConfigMismatchError, match=r"scenario\.sha256: '[0-9a-f]{64}' in the checkpoint"):
        run_scenario(changed, tiny_learner(exported), TINY, root, progress=False)


def test_another_checkpoint_cadence_resumes_the_same_run(exported, tiny, tiny_plain, tmp_path):
    root = interrupted(exported, tiny, tmp_path / "ck")
    again = run_scenario(tiny, tiny_learner(exported), RunConfig(epochs=2, checkpoint_every=7), root, progress=False)
    assert again.resumed and again.config["run"]["checkpoint_every"] == 7
    same_run(again, tiny_plain)


def _edit_epoch(text: str) -> str:
    return re.sub(r'"epoch": (\d+)', lambda m: f'"epoch": {int(m.group(1)) + 10}', text, count=1)


def _edit_task(text: str) -> str:
    return re.sub(r'"task": (\d+)', lambda m: f'"task": {int(m.group(1)) + 1}', text, count=1)


def _flip_position_key(text: str) -> str:
    return text.replace('"position"', '"poshtion"', 1)  # one bit of one byte of the key: "i" ^ 0x01


@pytest.mark.parametrize("edit", [_edit_epoch, _edit_task, _flip_position_key])
def test_an_edited_meta_json_falls_back_to_the_older_checkpoint(exported, tiny, tiny_plain, tmp_path, edit):
    """The three edits of issue 11: each resumed silently, crashed (IndexError) or failed with "error: 'position'"."""
    root = interrupted(exported, tiny, tmp_path / "ck")
    meta = latest(root) / "meta.json"
    text = meta.read_text()
    assert edit(text) != text
    meta.write_text(edit(text))
    with pytest.warns(RuntimeWarning, match=r"meta\.json has sha256 .* \(altered\); falling back to .*ckpt-"):
        again = run_scenario(tiny, tiny_learner(exported), TINY, root, progress=False)
    assert again.resumed
    same_run(again, tiny_plain)


def _redigest(folder) -> None:
    """What an edit the digest cannot catch looks like: meta.sha256 rewritten to match."""
    import hashlib

    digest = hashlib.sha256((folder / "meta.json").read_bytes()).hexdigest()
    (folder / "meta.sha256").write_text(f"{digest}  meta.json\n")


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["position"].update(task=0), r"accuracies after tasks \[0\]; accepted: after tasks \[\]"),
    (lambda m: m["position"].update(task=3), r"0 <= task <= 2"),
    (lambda m: m["position"].update(epoch=2), r"0 <= epoch < 2"),
    (lambda m: m["position"].update(batch=10**6), r"position batch=1000000; accepted: <= \d+"),
    (lambda m: m["position"].update(task="1"), r"position task='1'; accepted: an integer"),
    (lambda m: m["position"].update(task_begun=1), r"position task_begun=1; accepted: true or false"),
    (lambda m: m["position"].update(wall_s=-1.0), r"wall_s=-1.0; accepted: seconds >= 0"),
    (lambda m: m.update(position={"task": 1}), r"position \{'task': 1\}; accepted: a dict of task, epoch"),
    (lambda m: m.update(step=3), r"step=3 disagree"),
    (lambda m: m.pop("config"), r"records no run settings"),
])
def test_a_position_this_run_cannot_be_at_falls_back_too(exported, tiny, tiny_plain, tmp_path, edit, message):
    root = interrupted(exported, tiny, tmp_path / "ck")
    folder = latest(root)
    record = json.loads((folder / "meta.json").read_text())
    edit(record["meta"])
    (folder / "meta.json").write_text(json.dumps(record))
    _redigest(folder)
    with pytest.warns(RuntimeWarning, match=message):
        again = run_scenario(tiny, tiny_learner(exported), TINY, root, progress=False)
    same_run(again, tiny_plain)


def test_a_checkpoint_folder_another_process_writes_into_is_refused_before_training(exported, tiny, tmp_path):
    from edgecl.runtime.checkpoint import CheckpointWriter
    from edgecl.runtime.errors import FolderBusyError

    learner = tiny_learner(exported)
    with CheckpointWriter(tmp_path / "ck"):
        with pytest.raises(FolderBusyError, match=r"checkpoint folder '.*ck' is in use: another process"):
            run_scenario(tiny, learner, TINY, tmp_path / "ck", progress=False)
    assert learner.step == 0 and not (tmp_path / "ck" / "LATEST").exists()


def test_a_file_as_checkpoint_folder_is_refused_before_training(exported, tiny, tmp_path):
    (tmp_path / "f").write_text("mine")
    learner = tiny_learner(exported)
    with pytest.raises(ValueError, match=r"checkpoint folder '.*f' is a file; accepted: a folder"):
        run_scenario(tiny, learner, TINY, tmp_path / "f", progress=False)
    assert learner.step == 0 and (tmp_path / "f").read_text() == "mine"
