"""The fleet's Dirichlet class-incremental split: coverage, tasks, seeds, skew, order, arrival, files."""

from __future__ import annotations

import numpy as np
import pytest

from edgecl.fleet.scenario import ClientStream, dirichlet_fleet, write_client_files
from edgecl.runtime.data import load_npz
from edgecl.runtime.dataset import DataError, Dataset

CLASSES = 10
SHAPE = (1, 4, 4)


def toy(per_class: int = 40, seed: int = 0, shape=SHAPE, classes: int = CLASSES, name: str = "toy") -> Dataset:
    """Random images whose pixel [0, 0, 0] is the row's index, so a stream row traces back to train."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.repeat(np.arange(classes), per_class)).astype(np.int64)
    x = rng.random((len(y), *shape), dtype=np.float32)
    x[:, 0, 0, 0] = np.arange(len(y))
    return Dataset(name, x, y, classes)


def source_rows(stream: ClientStream) -> np.ndarray:
    return stream.x[:, 0, 0, 0].astype(np.int64)


@pytest.fixture(scope="module")
def split():
    return toy(), toy(per_class=5, seed=1, name="toy-test")


@pytest.fixture(scope="module")
def fleet(split):
    train, test = split
    return dirichlet_fleet(train, test, n_clients=6, n_tasks=5, alpha=0.5, seed=3)


def test_every_training_example_lands_in_exactly_one_stream(split, fleet):
    train, _ = split
    rows = np.concatenate([source_rows(s) for s in fleet.streams])
    assert len(rows) == len(train.y)
    np.testing.assert_array_equal(np.sort(rows), np.arange(len(train.y)))
    for s in fleet.streams:
        np.testing.assert_array_equal(s.y, train.y[source_rows(s)])  # labels travel with their images
        np.testing.assert_array_equal(s.x, train.x[source_rows(s)])
        assert s.x.dtype == np.float32 and s.y.dtype == np.int64


def test_tasks_partition_the_classes_and_each_task_holds_only_its_own(fleet):
    assert fleet.n_tasks == 5 and all(len(c) == 2 for c in fleet.task_classes)
    assert sorted(c for cs in fleet.task_classes for c in cs) == list(range(CLASSES))
    for k, s in enumerate(fleet.streams):
        for t, classes in enumerate(fleet.task_classes):
            labels = s.y[s.task_offsets[t]:s.task_offsets[t + 1]]
            assert set(labels.tolist()) <= set(classes)
            # the classes the device meets there are exactly those it holds, each in the task's set
            assert set(fleet.client_classes[k][t]) == set(labels.tolist())


def test_task_offsets_are_consistent(fleet):
    for k, s in enumerate(fleet.streams):
        off = s.task_offsets
        assert off.dtype == np.int64 and off.shape == (fleet.n_tasks + 1,)
        assert off[0] == 0 and off[-1] == len(s.y) and (np.diff(off) >= 0).all()
        for t in range(fleet.n_tasks):
            assert (np.isin(s.y, fleet.task_classes[t]).sum()) == off[t + 1] - off[t]
        assert [s.task_of(r) for r in range(len(s.y))] == np.repeat(np.arange(fleet.n_tasks), np.diff(off)).tolist()
        assert fleet.summary()[k]["examples_per_task"] == np.diff(off).tolist()
    assert fleet.seen_classes(1) == fleet.task_classes[0] + fleet.task_classes[1]


def test_same_seed_same_streams_other_seed_other_streams(split, fleet):
    train, test = split
    again = dirichlet_fleet(train, test, n_clients=6, n_tasks=5, alpha=0.5, seed=3)
    other = dirichlet_fleet(train, test, n_clients=6, n_tasks=5, alpha=0.5, seed=4)
    assert again.task_classes == fleet.task_classes and again.client_classes == fleet.client_classes
    for a, b in zip(again.streams, fleet.streams):
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)
        np.testing.assert_array_equal(a.task_offsets, b.task_offsets)
    assert any(len(a.y) != len(b.y) or not np.array_equal(source_rows(a), source_rows(b))
               for a, b in zip(other.streams, fleet.streams))


def test_small_alpha_skews_the_devices_and_a_huge_one_gives_each_every_class(split):
    train, test = split
    skewed = dirichlet_fleet(train, test, n_clients=8, n_tasks=5, alpha=0.1, seed=0)
    subsets = [tuple(frozenset(c) for c in cc) for cc in skewed.client_classes]
    assert len(set(subsets)) > 1
    assert any(len(c) < 2 for cc in skewed.client_classes for c in cc)  # some device misses a class of a task
    counts = np.array([np.bincount(s.y, minlength=CLASSES) for s in skewed.streams])  # device x class
    assert counts.max() > 2 * counts.mean()

    uniform = dirichlet_fleet(train, test, n_clients=4, n_tasks=5, alpha=1e4, seed=0)
    for k, cc in enumerate(uniform.client_classes):
        assert [set(c) for c in cc] == [set(c) for c in uniform.task_classes]
    counts = np.array([np.bincount(s.y, minlength=CLASSES) for s in uniform.streams])
    assert counts.min() >= 8 and counts.max() <= 12  # 40 examples a class over 4 devices: 10 each


def test_a_device_meets_its_first_class_mostly_first_with_overlap(split):
    train, test = split
    fleet = dirichlet_fleet(train, test, n_clients=3, n_tasks=5, alpha=1e4, seed=5)
    overlapping = 0
    for k, s in enumerate(fleet.streams):
        for t in range(fleet.n_tasks):
            first, second = fleet.client_classes[k][t]
            labels = s.y[s.task_offsets[t]:s.task_offsets[t + 1]]
            pos_first, pos_second = np.flatnonzero(labels == first), np.flatnonzero(labels == second)
            assert pos_first.mean() < pos_second.mean(), (k, t, labels)
            overlapping += pos_second.min() < pos_first.max()  # the next class starts before the first ends
    assert overlapping == 3 * fleet.n_tasks
    # and the devices' orders are their own: not every device meets the same class first everywhere
    firsts = {tuple(c[0] for c in cc) for cc in fleet.client_classes}
    assert len(firsts) > 1


def test_arrived_cuts_each_task_into_equal_rounds():
    s = ClientStream(np.zeros((25, *SHAPE), np.float32), np.zeros(25, np.int64), np.array([0, 10, 10, 25]))
    got = [s.arrived(r, 3) for r in range(1, 13)]
    assert got == [3, 6, 10, 10, 10, 10, 15, 20, 25, 25, 25, 25]
    assert [s.arrived(r, 1) for r in range(1, 5)] == [10, 10, 25, 25]
    assert [s.task_of(r) for r in (0, 9, 10, 24)] == [0, 0, 2, 2]  # the empty task 1 owns no row


def test_arrived_is_monotone_and_ends_each_task_at_its_last_round(fleet):
    rpt = 4
    for s in fleet.streams:
        got = [s.arrived(r, rpt) for r in range(1, rpt * fleet.n_tasks + 4)]
        assert all(a <= b for a, b in zip(got, got[1:]))
        for t in range(fleet.n_tasks):
            assert got[(t + 1) * rpt - 1] == s.task_offsets[t + 1]
        assert got[-4:] == [len(s.y)] * 4


@pytest.mark.parametrize("server_round, rounds_per_task, named", [(0, 2, "server_round=0"), (1, 0, "rounds_per_task=0"),
                                                                  (1.5, 2, "server_round=1.5"),
                                                                  (True, 2, "server_round=True")])
def test_arrived_refuses_bad_rounds(server_round, rounds_per_task, named):
    s = ClientStream(np.zeros((4, *SHAPE), np.float32), np.zeros(4, np.int64), np.array([0, 4]))
    with pytest.raises(ValueError, match=named):
        s.arrived(server_round, rounds_per_task)


@pytest.mark.parametrize("kwargs, named", [
    ({"n_clients": 0}, "n_clients=0"),
    ({"n_clients": 2.0}, "n_clients=2.0"),
    ({"alpha": 0}, "alpha=0"),
    ({"alpha": -1.0}, "alpha=-1.0"),
    ({"alpha": float("nan")}, "alpha=nan"),
    ({"alpha": float("inf")}, "alpha=inf"),
    ({"n_tasks": 3}, "n_tasks=3"),
    ({"n_tasks": 0}, "n_tasks=0"),
    ({"seed": -1}, "seed=-1"),
])
def test_bad_settings_are_refused_naming_the_value(split, kwargs, named):
    train, test = split
    with pytest.raises(ValueError, match=named):
        dirichlet_fleet(train, test, **({"n_clients": 2} | kwargs))


def test_a_test_set_of_another_data_set_is_refused(split):
    train, _ = split
    with pytest.raises(ValueError, match=r"\(1, 5, 5\)"):
        dirichlet_fleet(train, toy(per_class=2, shape=(1, 5, 5)), n_clients=2)
    with pytest.raises(ValueError, match="test set has 5 classes"):
        dirichlet_fleet(train, toy(per_class=2, classes=5), n_clients=2, n_tasks=5)


def test_save_load_round_trip_and_client_files(tmp_path, split, fleet):
    paths = write_client_files(fleet, tmp_path / "data")
    assert paths == [tmp_path / "data" / f"client-{k}.npz" for k in range(fleet.n_clients)]
    for path, s in zip(paths, fleet.streams):
        back = ClientStream.load(path)
        np.testing.assert_array_equal(back.x, s.x)
        np.testing.assert_array_equal(back.y, s.y)
        np.testing.assert_array_equal(back.task_offsets, s.task_offsets)
        assert back.y.dtype == np.int64 and back.task_offsets.dtype == np.int64
    test = load_npz(tmp_path / "data" / "test.npz")
    np.testing.assert_array_equal(test.x, split[1].x)
    np.testing.assert_array_equal(test.y, split[1].y)
    assert test.num_classes == CLASSES


def test_load_of_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="client-9.npz"):
        ClientStream.load(tmp_path / "client-9.npz")


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("corrupt", ["truncated", "garbage", "missing key", "offsets fall", "offsets short",
                                     "offsets not from 0", "x float64", "y length"])
def test_load_of_a_broken_stream_is_a_data_error_naming_the_path(tmp_path, fleet, corrupt):
    s = fleet.streams[0]
    path = tmp_path / "client-0.npz"
    n = len(s.y)
    good = {"x": s.x, "y": s.y, "task_offsets": s.task_offsets}
    if corrupt == "truncated":
        s.save(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif corrupt == "garbage":
        path.write_bytes(b"not a stream at all" * 10)
    elif corrupt == "missing key":
        _write(path, x=s.x, y=s.y)
    elif corrupt == "offsets fall":
        _write(path, **good | {"task_offsets": np.array([0, n - 1, 1, n])})
    elif corrupt == "offsets short":
        _write(path, **good | {"task_offsets": np.array([0, n - 1])})
    elif corrupt == "offsets not from 0":
        _write(path, **good | {"task_offsets": np.array([1, n])})
    elif corrupt == "x float64":
        _write(path, **good | {"x": s.x.astype(np.float64)})
    else:
        _write(path, **good | {"y": s.y[:-1]})
    with pytest.raises(DataError, match="client-0.npz"):
        ClientStream.load(path)
