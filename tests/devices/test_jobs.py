"""The agent's job specs and data on the board, without a link."""

from __future__ import annotations

import re

import numpy as np
import pytest

from edgecl.devices.jobs import DataSpec, TrainSpec, build_scenario, load_split, save_split
from edgecl.runtime.data import Dataset, save_npz


def toy(n: int, name: str, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(name, rng.random((n, 1, 4, 4), dtype=np.float32), np.arange(n) % 4, 4)


def test_pushed_split_round_trips_and_cuts_into_tasks(tmp_path):
    train, test = toy(40, "toy-train"), toy(12, "toy-test", 1)
    save_split(train, test, tmp_path / "data" / "toy", "toy")
    got_train, got_test = load_split(tmp_path / "data" / "toy")
    np.testing.assert_array_equal(got_train.x, train.x)
    np.testing.assert_array_equal(got_test.y, test.y)
    scenario = build_scenario(DataSpec("toy", tasks=2, classes_per_task=2), tmp_path)
    assert [t.classes for t in scenario.tasks] == [(0, 1), (2, 3)]
    assert len(scenario.tasks[0].y_train) == 20 and scenario.num_classes == 4
    permuted = build_scenario(DataSpec("toy", scenario="permuted", tasks=3), tmp_path)
    assert permuted.n_tasks == 3 and len(permuted.tasks[1].y_train) == 40


def test_a_data_set_on_the_board_is_split_80_20(tmp_path):
    save_npz(toy(40, "toy"), tmp_path / "toy.npz")
    scenario = build_scenario(DataSpec(board_path=f"npz:{tmp_path / 'toy.npz'}", tasks=1, classes_per_task=4), tmp_path)
    task = scenario.tasks[0]
    assert (len(task.y_train), len(task.y_test)) == (32, 8)


def test_missing_data_names_what_the_board_has(tmp_path):
    save_split(toy(8, "a"), toy(8, "b"), tmp_path / "data" / "have", "have")
    with pytest.raises(FileNotFoundError, match=r"no data 'nope' on the board \(push it first\); have: \['have'\]"):
        build_scenario(DataSpec("nope"), tmp_path)


@pytest.mark.parametrize("fields, message", [
    ({"data": None}, "exactly one of them"),
    ({"board_path": "npz:/x.npz"}, "exactly one of them"),
    ({"scenario": "rotated"}, "scenario='rotated'; accepted: split, permuted"),
    ({"tasks": 0}, "tasks=0; accepted: an integer >= 1"),
    ({"data": ".."}, "data='..'; accepted"),
])
def test_data_spec_refuses_bad_fields(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DataSpec(**{"data": "d", **fields})


@pytest.mark.parametrize("fields, message", [
    ({"method": "ewc"}, "method='ewc'; accepted: finetune, joint, er, derpp"),
    ({"method": "finetune"}, "SparCL"),
    ({"buffer": None}, "give a buffer .* or a memory budget"),
    ({"buffer": 0}, "buffer=0"),
    ({"epochs": 0}, "epochs=0"),
    ({"lr": 0.0}, "lr=0.0"),
    ({"run": "../../etc"}, "run='../../etc'; accepted"),
    ({"artifact": "a/b"}, "artifact='a/b'; accepted"),
    ({"data": "digits"}, "data='digits'; accepted: a DataSpec"),
])
def test_train_spec_refuses_bad_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainSpec(**{"run": "r", "artifact": "a", "data": DataSpec("d"), **fields})


def test_train_spec_round_trips_through_a_dict():
    spec = TrainSpec(run="r", artifact="a", data=DataSpec("d", tasks=2), sparsity=None, method="er", budget="4MiB", buffer=None)
    again = TrainSpec(**spec.to_dict())
    assert again == spec and again.strategy().label == "ER"


@pytest.fixture
def board_workdir(tmp_path, exported):
    """A workdir as the agent keeps it: the mlp artifacts and the digits pushed."""
    import shutil

    from edgecl.runtime.data import load_digits
    from edgecl.runtime.scenarios import train_test_split

    shutil.copytree(exported("mlp")[1], tmp_path / "artifacts" / "mlp")
    train_set, test_set = train_test_split(load_digits(), 0.2, 0)
    save_split(train_set, test_set, tmp_path / "data" / "digits", "digits")
    return tmp_path


def board_spec(**kw) -> TrainSpec:
    fields = dict(run="r", artifact="mlp", data=DataSpec("digits", tasks=2), method="er", sparsity=0.75, buffer=50,
                  epochs=1, threads=1, checkpoint_every=5)
    return TrainSpec(**{**fields, **kw})


def test_a_train_under_another_spec_is_refused_naming_each_field(board_workdir):
    """The agent's resume check is the runtime's: the spec is in the checkpoints, compared field by field."""
    from edgecl.devices.jobs import train
    from edgecl.runtime.checkpoint import load_checkpoint
    from edgecl.runtime.errors import ConfigMismatchError

    first = train(board_spec(), board_workdir)
    checkpoints = board_workdir / "runs" / "r" / "checkpoints"
    assert load_checkpoint(checkpoints).meta["config"]["job"]["epochs"] == 1
    before = sorted((p.name, p.stat().st_mtime_ns) for p in checkpoints.rglob("*"))
    for change, difference in [({"epochs": 2}, "epochs: 1 in the checkpoint, 2 now"),
                               ({"threads": 2}, "threads: 1 in the checkpoint, 2 now"),
                               ({"data": DataSpec("digits", tasks=2, seed=1)},
                                "data.seed: 0 in the checkpoint, 1 now")]:
        with pytest.raises(ConfigMismatchError, match=rf"run 'r' exists on the board with another spec: "
                           rf"{re.escape(difference)}; accepted: the same spec \(resumes\) or restart"):
            train(board_spec(**change), board_workdir)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in checkpoints.rglob("*")) == before
    again = train(board_spec(checkpoint_every=3), board_workdir)  # the cadence is free: the same run resumes
    assert again.resumed and again.acc_matrix == first.acc_matrix
    anew = train(board_spec(epochs=2), board_workdir, restart=True)
    assert not anew.resumed and anew.steps > first.steps
@pytest.mark.parametrize("fields, message", [
    ({"buffer": 10**12}, r"buffer=1000000000000 examples \(306 B each\) is 306,000,000,000,000 B \(278.31 TiB\), more "
                         r"than this machine has: .* available of .* total; accepted: buffer <= [\d,]+ examples"),
    ({"buffer": None, "budget": "10 TiB"}, r"budget='10 TiB' is 10,995,116,277,760 B \(10.00 TiB\), more than this "
                                           r"machine has"),
])
def test_the_agent_refuses_a_buffer_or_budget_its_machine_cannot_hold_and_writes_nothing(tmp_path, exported, fields,
                                                                                          message):
    import shutil

    from edgecl.devices.jobs import train

    _, art = exported("cnn")
    shutil.copytree(art, tmp_path / "artifacts" / "cnn")
    spec = TrainSpec(run="huge", artifact="cnn", data=DataSpec(board_path="digits"), **fields)
    with pytest.raises(ValueError, match=message):
        train(spec, tmp_path)
    assert not (tmp_path / "runs").exists()  # no run folder, no spec.json: nothing to resume or clean up
