"""Scenarios on literal tiny data sets: partitions of classes and examples, determinism, permutations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecl.runtime.data import FASHION_MNIST_ROOT, Dataset
from edgecl.runtime.scenarios import (
    Scenario, ScenarioKind, Task, cifar10_scenario, digits_scenario, fashion_mnist_scenario, permute_pixels,
    permuted_scenario, pixel_permutations, split_scenario, train_test_split,
)
from tests.runtime.test_data import write_cifar_batches, write_fashion_root


def tagged(labels, num_classes: int, name: str = "toy", first_tag: int = 0, shape=(1, 2, 3)) -> Dataset:
    """Example i has every pixel distinct and pixel 0 equal to its tag (first_tag + i), so tasks can be
    traced back to the examples they came from and permutations read off the pixels."""
    n, size = len(labels), int(np.prod(shape))
    x = (np.arange(n)[:, None] * size + np.arange(size)[None, :]).astype(np.float32) / size + first_tag
    x[:, 0] = np.arange(first_tag, first_tag + n)
    return Dataset(name, x.reshape(n, *shape), np.array(labels, np.int64), num_classes)


def tags(x: np.ndarray) -> list[int]:
    return x.reshape(len(x), -1)[:, 0].astype(int).tolist()


TRAIN = tagged([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 5, 5], 6, "toy-train")
TEST = tagged([5, 4, 3, 2, 1, 0], 6, "toy-test", first_tag=100)


# --- split_scenario --------------------------------------------------------------------------------


def test_split_partitions_classes_and_examples_in_order():
    s = split_scenario(TRAIN, TEST, n_tasks=3)
    assert s.name == "split-toy" and s.kind is ScenarioKind.CLASS_IL and s.num_classes == 6 and s.n_tasks == 3
    assert [t.classes for t in s.tasks] == [(0, 1), (2, 3), (4, 5)]
    assert [t.id for t in s.tasks] == [0, 1, 2] and s.input_shape == (1, 2, 3)
    assert tags(s.tasks[2].x_train) == [4, 5, 10, 11, 12, 13]  # data set order, labels unchanged
    assert s.tasks[2].y_train.tolist() == [4, 5, 4, 5, 5, 5]
    assert tags(s.tasks[0].x_test) == [104, 105] and s.tasks[0].y_test.tolist() == [1, 0]
    assert sorted(sum((tags(t.x_train) for t in s.tasks), [])) == list(range(len(TRAIN.y)))
    assert sorted(sum((tags(t.x_test) for t in s.tasks), [])) == list(range(100, 100 + len(TEST.y)))


def test_split_class_order_and_sizes():
    s = split_scenario(TRAIN, TEST, 3, class_order=[5, 3, 1, 0, 2, 4], kind="task-il")
    assert [t.classes for t in s.tasks] == [(5, 3), (1, 0), (2, 4)] and s.kind is ScenarioKind.TASK_IL
    s = split_scenario(TRAIN, TEST, 3, classes_per_task=[3, 2, 1])
    assert [t.classes for t in s.tasks] == [(0, 1, 2), (3, 4), (5,)]
    s = split_scenario(TRAIN, TEST, 2, classes_per_task=2)  # classes 4 and 5 are left out
    assert [t.classes for t in s.tasks] == [(0, 1), (2, 3)] and sum(len(t.y_train) for t in s.tasks) == 8


def test_split_random_class_order_is_deterministic_per_seed():
    def order(seed):
        return [t.classes for t in split_scenario(TRAIN, TEST, 3, class_order="random", seed=seed).tasks]

    assert order(0) == order(0) and order(1) == order(1)
    assert len({tuple(order(seed)) for seed in range(5)}) > 1
    assert sorted(sum(order(3), ())) == list(range(6))


@given(st.integers(1, 8), st.data())
@settings(max_examples=60, deadline=None)
def test_split_is_a_partition_for_any_sizes(num_classes, data):
    n_tasks = data.draw(st.sampled_from([d for d in range(1, num_classes + 1) if num_classes % d == 0]))
    counts = data.draw(st.lists(st.integers(1, 4), min_size=num_classes, max_size=num_classes))
    labels = data.draw(st.permutations(np.repeat(np.arange(num_classes), counts).tolist()))
    train, test = tagged(labels, num_classes), tagged(sorted(labels), num_classes, first_tag=1000)
    s = split_scenario(train, test, n_tasks, class_order="random", seed=data.draw(st.integers(0, 99)))
    classes = [c for t in s.tasks for c in t.classes]
    assert sorted(classes) == list(range(num_classes))  # disjoint and covering
    assert all(len(t.classes) == num_classes // n_tasks for t in s.tasks)
    assert sorted(sum((tags(t.x_train) for t in s.tasks), [])) == list(range(len(labels)))
    for t in s.tasks:
        assert set(t.y_train.tolist()) == set(t.classes) == set(t.y_test.tolist())
        np.testing.assert_array_equal(train.y[tags(t.x_train)], t.y_train)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_tasks=4), "n_tasks=4 does not divide the 6 classes"),
    (dict(n_tasks=0), "n_tasks=0; accepted: >= 1"),
    (dict(n_tasks=2, classes_per_task=4), "classes_per_task=4 with n_tasks=2; accepted: .* at most the 6 classes"),
    (dict(n_tasks=2, classes_per_task=[1, 2, 3]), r"classes_per_task=\[1, 2, 3\] with n_tasks=2"),
    (dict(n_tasks=2, classes_per_task=[0, 3]), "each >= 1"),
    (dict(n_tasks=3, class_order=[0, 1, 2, 3, 4, 4]), r"class_order=\(0, 1, 2, 3, 4, 4\); accepted: a permutation"),
    (dict(n_tasks=3, class_order="sorted"), "class_order='sorted'; accepted: None, 'random'"),
    (dict(n_tasks=3, kind="domain-il"), "use permuted_scenario"),
    (dict(n_tasks=3, kind="class-IL"), "scenario kind 'class-IL' is unknown; accepted: class-il, task-il, domain-il"),
])
def test_split_errors_name_the_bad_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        split_scenario(TRAIN, TEST, **kwargs)


def test_split_refuses_a_class_without_examples_and_mismatched_splits():
    test_without_3 = tagged([0, 1, 2, 4, 5], 6, "toy-test")
    with pytest.raises(ValueError, match=r"toy-test: classes \[3\] have no examples"):
        split_scenario(TRAIN, test_without_3, 3)
    assert split_scenario(TRAIN, test_without_3, 1, classes_per_task=3).n_tasks == 1  # class 3 unused: fine
    with pytest.raises(ValueError, match="differ; accepted: the same class count and input shape"):
        split_scenario(TRAIN, tagged([0, 1, 2, 3, 4, 5], 6, shape=(1, 3, 2)), 3)
    with pytest.raises(ValueError, match=r"\(7 classes"):
        split_scenario(TRAIN, tagged([0, 1, 2, 3, 4, 5], 7), 3)


# --- permuted_scenario -----------------------------------------------------------------------------


def recovered_permutation(original: np.ndarray, permuted: np.ndarray) -> np.ndarray:
    """The p with permuted[..., j] == original[..., p[j]], read off distinct pixel values."""
    flat_o, flat_p = original.reshape(-1), permuted.reshape(-1)
    where = {v: i for i, v in enumerate(flat_o.tolist())}
    return np.array([where[v] for v in flat_p.tolist()])


def test_pixel_permutations_are_bijections_deterministic_per_seed():
    perms = pixel_permutations(4, 50, seed=7)
    assert np.array_equal(perms[0], np.arange(50))
    assert all(sorted(p.tolist()) == list(range(50)) and p.dtype == np.int64 for p in perms)
    assert len({p.tobytes() for p in perms}) == 4
    assert all(np.array_equal(a, b) for a, b in zip(perms, pixel_permutations(4, 50, seed=7)))
    assert not np.array_equal(perms[1], pixel_permutations(4, 50, seed=8)[1])
    assert not np.array_equal(pixel_permutations(2, 50, first_identity=False)[0], np.arange(50))
    with pytest.raises(ValueError, match="n_tasks=0, n_pixels=5; accepted: both >= 1"):
        pixel_permutations(0, 5)


def test_permute_pixels_moves_whole_pixels_across_channels():
    x = np.arange(2 * 2 * 2 * 2, dtype=np.float32).reshape(2, 2, 2, 2)
    out = permute_pixels(x, np.array([3, 2, 0, 1]))
    np.testing.assert_array_equal(out[1, 1].reshape(-1), x[1, 1].reshape(-1)[[3, 2, 0, 1]])
    np.testing.assert_array_equal(out[0, 0].reshape(-1), [3, 2, 0, 1])


def test_permuted_tasks_share_labels_and_one_permutation_per_task():
    train = tagged([0, 1, 2, 0, 1], 3, "toy-train", shape=(2, 3, 3))
    test = tagged([2, 1, 0], 3, "toy-test", first_tag=100, shape=(2, 3, 3))
    s = permuted_scenario(train, test, n_tasks=3, seed=5)
    assert s.name == "permuted-toy" and s.kind is ScenarioKind.DOMAIN_IL and s.n_tasks == 3
    expected = pixel_permutations(3, 9, seed=5)
    for t in s.tasks:
        assert t.classes == (0, 1, 2)
        np.testing.assert_array_equal(t.y_train, train.y)
        np.testing.assert_array_equal(t.y_test, test.y)
        for original, permuted in [(train.x, t.x_train), (test.x, t.x_test)]:
            for i in range(len(original)):
                for c in range(2):  # one permutation for every example and channel, train and test
                    found = recovered_permutation(original[i, c], permuted[i, c])
                    np.testing.assert_array_equal(found, expected[t.id])
    np.testing.assert_array_equal(s.tasks[0].x_train, train.x)  # task 0: the original images
    again = permuted_scenario(train, test, 3, seed=5)
    assert all(np.array_equal(a.x_test, b.x_test) for a, b in zip(s.tasks, again.tasks))
    with pytest.raises(ValueError, match="n_tasks=0"):
        permuted_scenario(train, test, 0)


# --- train_test_split ------------------------------------------------------------------------------


def test_train_test_split_is_stratified_disjoint_and_seeded():
    data = tagged([0] * 10 + [1] * 2 + [2] * 5, 4, "d")  # class 3 has no examples
    train, test = train_test_split(data, 0.3, seed=1)
    assert train.name == "d-train" and test.name == "d-test" and train.num_classes == test.num_classes == 4
    assert np.bincount(test.y, minlength=4).tolist() == [3, 1, 2, 0]  # round(0.3 n), at least 1, at most n - 1
    assert sorted(tags(train.x) + tags(test.x)) == list(range(17))
    assert tags(test.x) == sorted(tags(test.x))  # original order kept
    assert tags(train_test_split(data, 0.3, seed=1)[1].x) == tags(test.x)
    assert len({tuple(tags(train_test_split(data, 0.3, seed=s)[1].x)) for s in range(6)}) > 1
    assert np.bincount(train_test_split(data, 0.01)[1].y, minlength=4).tolist() == [1, 1, 1, 0]
    assert np.bincount(train_test_split(data, 0.99)[0].y, minlength=4).tolist() == [1, 1, 1, 0]


@pytest.mark.parametrize("fraction", [0, 1, -0.5, 1.5])
def test_train_test_split_fraction_out_of_range(fraction):
    with pytest.raises(ValueError, match=f"test_fraction={fraction!r}; accepted: 0 < test_fraction < 1"):
        train_test_split(TRAIN, fraction)


def test_train_test_split_refuses_a_single_example_class():
    with pytest.raises(ValueError, match="class 2 has 1 example"):
        train_test_split(tagged([0, 0, 1, 1, 2], 3), 0.5)


# --- Task / Scenario validation --------------------------------------------------------------------


def _task(task_id, classes, labels):
    d = tagged(labels, 10)
    return Task(task_id, classes, d.x, d.y, d.x, d.y)


def test_task_and_scenario_validation():
    with pytest.raises(ValueError, match=r"task 0 train: labels \[2\] are not among the task's classes \(0, 1\)"):
        _task(0, (0, 1), [0, 1, 2])
    with pytest.raises(ValueError, match="classes=\\(1, 1\\); accepted: one or more distinct"):
        _task(0, (1, 1), [1])
    a, b, c = _task(0, (0, 1), [0, 1]), _task(1, (1, 2), [1, 2]), _task(1, (2, 3), [2, 3])
    assert Scenario("ok", (a, c), 10).kind is ScenarioKind.CLASS_IL
    with pytest.raises(ValueError, match="a class appears in more than one task"):
        Scenario("s", (a, b), 10, "task-il")
    with pytest.raises(ValueError, match="tasks have different classes"):
        Scenario("s", (a, c), 10, "domain-il")
    with pytest.raises(ValueError, match=r"task ids \[1, 0\]; accepted: 0..1 in order"):
        Scenario("s", (c, a), 10)
    with pytest.raises(ValueError, match=r"class ids span \[0, 3\]; accepted: \[0, 2\]"):
        Scenario("s", (a, c), 3)
    with pytest.raises(ValueError, match="has no tasks"):
        Scenario("s", (), 10)


# --- presets ---------------------------------------------------------------------------------------


def test_digits_scenario_is_split_digits():
    s = digits_scenario(seed=0)
    assert s.name == "split-digits" and [t.classes for t in s.tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert sum(len(t.y_train) + len(t.y_test) for t in s.tasks) == 1797
    assert 0.18 < sum(len(t.y_test) for t in s.tasks) / 1797 < 0.22
    assert np.array_equal(s.tasks[3].x_test, digits_scenario(seed=0).tasks[3].x_test)
    assert not np.array_equal(s.tasks[3].x_test, digits_scenario(seed=1).tasks[3].x_test)
    assert digits_scenario(kind="task-il").kind is ScenarioKind.TASK_IL


def test_digits_read_back_from_the_npz_a_board_gets_give_the_same_scenario(tmp_path):
    """`edgecl run`'s training process gets the digits this way: without scikit-learn."""
    from edgecl.runtime.data import load_digits, load_npz, save_npz

    save_npz(load_digits(), tmp_path / "digits.npz")
    here, there = digits_scenario(seed=3), digits_scenario(seed=3, digits=load_npz(tmp_path / "digits.npz"))
    assert there.name == here.name and there.input_shape == here.input_shape
    for a, b in zip(here.tasks, there.tasks, strict=True):
        assert a.classes == b.classes
        for name in ("x_train", "y_train", "x_test", "y_test"):
            assert getattr(a, name).dtype == getattr(b, name).dtype
            assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_fashion_mnist_and_cifar10_presets_on_written_files(tmp_path):
    s = fashion_mnist_scenario(write_fashion_root(tmp_path / "fm", n_train=20, n_test=10))
    assert s.name == "split-fashion-mnist" and s.input_shape == (1, 28, 28)
    assert [(len(t.y_train), len(t.y_test)) for t in s.tasks] == [(4, 2)] * 5
    write_cifar_batches(tmp_path / "c", n=10)
    s = cifar10_scenario(tmp_path / "c", kind="task-il")
    assert s.name == "split-cifar10" and s.input_shape == (3, 32, 32) and s.kind is ScenarioKind.TASK_IL
    assert sum(len(t.y_train) for t in s.tasks) == 50


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).is_dir(), reason="dataset-fashion-mnist is not installed")
def test_split_fashion_mnist_on_the_installed_data():
    s = fashion_mnist_scenario()
    assert [(len(t.y_train), len(t.y_test)) for t in s.tasks] == [(12000, 2000)] * 5


def test_subset_and_padded_scenarios_keep_labels_classes_and_order():
    from edgecl.runtime.scenarios import padded_scenario, subset_scenario

    full = digits_scenario(seed=0)
    short = subset_scenario(full, train_per_task=20, test_per_task=5, seed=3)
    for a, b in zip(full.tasks, short.tasks):
        assert len(b.x_train) == 20 and len(b.x_test) == 5 and b.classes == a.classes
        rows = [int(np.flatnonzero((a.x_train == x).all(axis=(1, 2, 3)))[0]) for x in b.x_train]
        assert rows == sorted(rows) and np.array_equal(a.y_train[rows], b.y_train)  # a subset, in order
    assert subset_scenario(full, 20, 5, seed=3).tasks[0].x_train.tobytes() == short.tasks[0].x_train.tobytes()
    padded = padded_scenario(full, 12)
    assert padded.input_shape == (1, 12, 12)
    assert np.array_equal(padded.tasks[0].x_train[:, :, 2:10, 2:10], full.tasks[0].x_train)
    assert padded.tasks[0].x_train[:, :, :2].sum() == 0


@pytest.mark.parametrize("call, words", [
    (lambda s: __import__("edgecl.runtime.scenarios", fromlist=["x"]).subset_scenario(s, 0), "train_per_task=0"),
    (lambda s: __import__("edgecl.runtime.scenarios", fromlist=["x"]).subset_scenario(s, None, 2.5), "test_per_task=2.5"),
    (lambda s: __import__("edgecl.runtime.scenarios", fromlist=["x"]).padded_scenario(s, 6), "size=6; accepted: an "
                                                                                             "integer >= the images' 8x8"),
])
def test_bad_subset_or_pad_sizes_are_refused(call, words):
    with pytest.raises(ValueError) as info:
        call(digits_scenario(seed=0))
    assert words in str(info.value)
