"""Continual-learning scenarios as data: a sequence of tasks, each with its own train and test arrays.

Two constructions cover the benchmarks of SparCL (Wang et al., NeurIPS 2022) and Mammoth
(Buzzega et al. 2020): `split_scenario` (Split Digits / Fashion-MNIST / CIFAR-10: disjoint class
groups, class- or task-incremental) and `permuted_scenario` (Permuted MNIST style: the same classes
under a different fixed pixel permutation per task, domain-incremental). Labels stay the data
set's global labels in every scenario; task-IL evaluation restricts the logits to `Task.classes`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from enum import Enum

import numpy as np

from .cifar import load_cifar10
from .data import FASHION_MNIST_ROOT, Dataset, load_digits, load_fashion_mnist


class ScenarioKind(str, Enum):
    CLASS_IL = "class-il"  # one head over all classes seen so far, no task id at test time
    TASK_IL = "task-il"  # the task id is given at test time: predict among that task's classes
    DOMAIN_IL = "domain-il"  # every task has the same classes; the input distribution changes


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """One task: its classes and its train / test examples (x float32 (N, C, H, W), y int64 (N,)).

    Raises:
        ValueError: no or repeated classes, malformed arrays, or a label outside `classes`.
    """

    id: int
    classes: tuple[int, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"task {self.id}: classes={self.classes}; accepted: one or more distinct class ids")
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.ndim != 4 or x.dtype != np.float32 or y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
                raise ValueError(f"task {self.id} {split}: x {x.shape} {x.dtype}, y {y.shape} {y.dtype}; "
                                 f"accepted: x (N, C, H, W) float32, y (N,) integers")
            stray = np.setdiff1d(y, self.classes)
            if stray.size:
                raise ValueError(f"task {self.id} {split}: labels {stray.tolist()} are not among the task's "
                                 f"classes {self.classes}")


@dataclasses.dataclass(frozen=True, eq=False)
class Scenario:
    """A named sequence of tasks over `num_classes` classes, of one kind (class-, task- or domain-IL).

    Raises:
        ValueError: an unknown kind, no tasks, task ids not 0..T-1 in order, a class id outside
            [0, num_classes), tasks with different input shapes, overlapping classes in a class-IL
            or task-IL scenario, or differing classes in a domain-IL one.
    """

    name: str
    tasks: tuple[Task, ...]
    num_classes: int
    kind: ScenarioKind = ScenarioKind.CLASS_IL

    def __post_init__(self):
        object.__setattr__(self, "kind", _kind(self.kind))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if not self.tasks:
            raise ValueError(f"scenario {self.name!r} has no tasks; accepted: one or more")
        ids = [t.id for t in self.tasks]
        if ids != list(range(len(ids))):
            raise ValueError(f"scenario {self.name!r}: task ids {ids}; accepted: 0..{len(ids) - 1} in order")
        seen = [c for t in self.tasks for c in t.classes]
        if min(seen) < 0 or max(seen) >= self.num_classes:
            raise ValueError(f"scenario {self.name!r}: class ids span [{min(seen)}, {max(seen)}]; "
                             f"accepted: [0, {self.num_classes - 1}] (num_classes={self.num_classes})")
        shapes = {t.x_train.shape[1:] for t in self.tasks} | {t.x_test.shape[1:] for t in self.tasks}
        if len(shapes) != 1:
            raise ValueError(f"scenario {self.name!r}: tasks have input shapes {sorted(shapes)}; accepted: one shape")
        if self.kind is ScenarioKind.DOMAIN_IL:
            if len({frozenset(t.classes) for t in self.tasks}) != 1:
                raise ValueError(f"domain-IL scenario {self.name!r}: tasks have different classes; accepted: the same")
        elif len(set(seen)) != len(seen):
            raise ValueError(f"{self.kind.value} scenario {self.name!r}: a class appears in more than one task "
                             f"({[t.classes for t in self.tasks]}); accepted: disjoint classes")

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every example."""
        return tuple(self.tasks[0].x_train.shape[1:])


def split_scenario(train: Dataset, test: Dataset, n_tasks: int, classes_per_task: int | Sequence[int] | None = None,
                   class_order: Sequence[int] | str | None = None, seed: int = 0,
                   kind: ScenarioKind | str = ScenarioKind.CLASS_IL, name: str | None = None) -> Scenario:
    """Split a data set into tasks of disjoint classes (Split MNIST / CIFAR-10 as in SparCL and Mammoth).

    Task t takes the next classes_per_task[t] classes of `class_order` and every train / test example
    of those classes, in data set order (shuffling is the training loop's job). Labels are unchanged.

    Args:
        train, test: the two splits; same num_classes and input shape.
        n_tasks: number of tasks (>= 1).
        classes_per_task: None: num_classes / n_tasks (must divide); an int: the same for every task;
            a sequence of n_tasks ints (e.g. a large first task). Classes past the sum are left out.
        class_order: None: 0, 1, ..., num_classes - 1 (the SparCL / Mammoth protocol); "random": a
            permutation drawn from `seed`; a sequence: a permutation of 0..num_classes - 1.
        seed: only used by class_order="random".
        kind: "class-il" or "task-il" (the data are the same; evaluation differs).
        name: None: "split-" + train.name without a trailing "-train".

    Returns:
        Scenario with n_tasks tasks.

    Raises:
        ValueError: mismatched splits, n_tasks < 1, class counts that do not fit num_classes, a bad
            class order, kind "domain-il", or a used class with no train or no test example.
    """
    _check_pair(train, test)
    kind = _kind(kind)
    if kind is ScenarioKind.DOMAIN_IL:
        raise ValueError("kind='domain-il' does not split classes; accepted: 'class-il', 'task-il' "
                         "(for domain-IL use permuted_scenario)")
    k = train.num_classes
    if n_tasks < 1:
        raise ValueError(f"n_tasks={n_tasks}; accepted: >= 1")
    sizes = _task_sizes(n_tasks, classes_per_task, k)
    order = _class_order(class_order, k, seed)
    for split in (train, test):
        counts = np.bincount(split.y, minlength=k)
        empty = [c for c in order[:sum(sizes)] if counts[c] == 0]
        if empty:
            raise ValueError(f"{split.name}: classes {empty} have no examples; accepted: every class of a task "
                             f"has train and test examples")
    tasks, start = [], 0
    for t, size in enumerate(sizes):
        classes = order[start:start + size]
        start += size
        tr, te = np.isin(train.y, classes), np.isin(test.y, classes)
        tasks.append(Task(t, classes, train.x[tr], train.y[tr], test.x[te], test.y[te]))
    return Scenario(name or f"split-{train.name.removesuffix('-train')}", tuple(tasks), k, kind)


def pixel_permutations(n_tasks: int, n_pixels: int, seed: int = 0, first_identity: bool = True) -> list[np.ndarray]:
    """One fixed permutation of pixel positions per task (Permuted MNIST, Goodfellow et al. 2013).

    Args:
        n_tasks: number of permutations (>= 1). n_pixels: H * W.
        seed: seeds every random permutation. first_identity: True: task 0 sees the original images
            (a baseline task), tasks 1.. random permutations; False: every task is permuted (Mammoth).

    Returns:
        n_tasks int64 arrays of shape (n_pixels,), each a permutation of 0..n_pixels - 1.

    Raises:
        ValueError: n_tasks < 1 or n_pixels < 1.
    """
    if n_tasks < 1 or n_pixels < 1:
        raise ValueError(f"n_tasks={n_tasks}, n_pixels={n_pixels}; accepted: both >= 1")
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(n_pixels).astype(np.int64) for _ in range(n_tasks)]
    if first_identity:
        perms[0] = np.arange(n_pixels, dtype=np.int64)
    return perms


def permute_pixels(x: np.ndarray, permutation: np.ndarray) -> np.ndarray:
    """Images x (N, C, H, W) with out[..., j] = x[..., permutation[j]] over the H * W flattened
    positions, the same for every channel. Returns a new array."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h * w)[:, :, permutation].reshape(n, c, h, w)


def permuted_scenario(train: Dataset, test: Dataset, n_tasks: int, seed: int = 0, first_identity: bool = True,
                      name: str | None = None) -> Scenario:
    """Domain-incremental tasks: every task holds all examples under its own fixed pixel permutation.

    Train and test of a task share its permutation (see pixel_permutations). Every task stores its
    own permuted copy: memory is n_tasks times the data set's bytes.

    Args:
        train, test: the two splits; same num_classes and input shape. n_tasks: >= 1.
        seed, first_identity: see pixel_permutations. name: None: "permuted-" + train.name without "-train".

    Returns:
        Scenario of kind domain-IL; every task has classes 0..num_classes - 1.

    Raises:
        ValueError: mismatched splits or n_tasks < 1.
    """
    _check_pair(train, test)
    h, w = train.x.shape[2:]
    classes = tuple(range(train.num_classes))
    tasks = [Task(t, classes, permute_pixels(train.x, p), train.y.copy(), permute_pixels(test.x, p), test.y.copy())
             for t, p in enumerate(pixel_permutations(n_tasks, h * w, seed, first_identity))]
    return Scenario(name or f"permuted-{train.name.removesuffix('-train')}", tuple(tasks), train.num_classes,
                    ScenarioKind.DOMAIN_IL)


def train_test_split(dataset: Dataset, test_fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Stratified split: each class puts round(test_fraction * its count) examples (at least 1, at
    most count - 1) into the test set, drawn with `seed`. For data without an official split (digits).

    Returns:
        (train, test) named "<name>-train", "<name>-test", examples in their original order.

    Raises:
        ValueError: test_fraction outside (0, 1), or a class with a single example.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction!r}; accepted: 0 < test_fraction < 1")
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in range(dataset.num_classes):
        idx = np.flatnonzero(dataset.y == c)
        if len(idx) == 0:
            continue
        if len(idx) == 1:
            raise ValueError(f"{dataset.name}: class {c} has 1 example; accepted: 0 or >= 2 per class "
                             f"(one for each side of a stratified split)")
        n_test = min(max(round(test_fraction * len(idx)), 1), len(idx) - 1)
        test_idx.append(rng.permutation(idx)[:n_test])
    is_test = np.zeros(len(dataset.y), bool)
    if test_idx:
        is_test[np.concatenate(test_idx)] = True
    return (_subset(dataset, ~is_test, f"{dataset.name}-train"), _subset(dataset, is_test, f"{dataset.name}-test"))


def digits_scenario(seed: int = 0, kind: ScenarioKind | str = ScenarioKind.CLASS_IL,
                    digits: Dataset | None = None) -> Scenario:
    """Split Digits: scikit-learn's digits, a stratified 80 / 20 split drawn with `seed`, 5 tasks of
    2 classes in order 0..9. The embedded default (no download).

    Args:
        digits: the digits, already loaded (e.g. `load_npz` of what `save_npz` wrote, without
            scikit-learn); default `load_digits()`.
    """
    train, test = train_test_split(load_digits() if digits is None else digits, 0.2, seed)
    return split_scenario(train, test, n_tasks=5, kind=kind, name="split-digits")


def fashion_mnist_scenario(root=FASHION_MNIST_ROOT, kind: ScenarioKind | str = ScenarioKind.CLASS_IL) -> Scenario:
    """Split Fashion-MNIST: the official 60 000 / 10 000 split, 5 tasks of 2 classes in order 0..9."""
    return split_scenario(load_fashion_mnist(root, "train"), load_fashion_mnist(root, "test"), n_tasks=5,
                          kind=kind, name="split-fashion-mnist")


def cifar10_scenario(root, kind: ScenarioKind | str = ScenarioKind.CLASS_IL) -> Scenario:
    """Split CIFAR-10 (SparCL's main benchmark): the official 50 000 / 10 000 split, 5 tasks of 2 classes."""
    return split_scenario(load_cifar10(root, "train"), load_cifar10(root, "test"), n_tasks=5, kind=kind,
                          name="split-cifar10")


def subset_scenario(scenario: Scenario, train_per_task: int | None = None, test_per_task: int | None = None,
                    seed: int = 0) -> Scenario:
    """A shorter run of the same scenario: at most `train_per_task` / `test_per_task` examples of each
    task (None: all), drawn at random with `seed`, in their original order.

    Raises:
        ValueError: a count that is not an integer >= 1, or fewer examples than the task's classes.
    """
    for name, n in (("train_per_task", train_per_task), ("test_per_task", test_per_task)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
            raise ValueError(f"{name}={n!r}; accepted: an integer >= 1, or None (every example)")
    rng = np.random.default_rng(seed)

    def cut(x, y, n):
        if n is None or n >= len(x):
            return x, y
        keep = np.sort(rng.choice(len(x), size=n, replace=False))
        return x[keep], y[keep]

    tasks = tuple(Task(t.id, t.classes, *cut(t.x_train, t.y_train, train_per_task),
                       *cut(t.x_test, t.y_test, test_per_task)) for t in scenario.tasks)
    return Scenario(f"{scenario.name}-subset", tasks, scenario.num_classes, scenario.kind)


def padded_scenario(scenario: Scenario, size: int) -> Scenario:
    """Every image zero-padded (centred) to size x size, e.g. 28x28 Fashion-MNIST to the 32x32 of the
    CIFAR-layout ResNet-18.

    Raises:
        ValueError: a size smaller than the images or not an integer.
    """
    _, h, w = scenario.input_shape
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < max(h, w):
        raise ValueError(f"size={size!r}; accepted: an integer >= the images' {h}x{w}")
    top, left = (size - h) // 2, (size - w) // 2
    pad = ((0, 0), (0, 0), (top, size - h - top), (left, size - w - left))
    tasks = tuple(Task(t.id, t.classes, np.pad(t.x_train, pad), t.y_train, np.pad(t.x_test, pad), t.y_test)
                  for t in scenario.tasks)
    return Scenario(f"{scenario.name}-{size}x{size}", tasks, scenario.num_classes, scenario.kind)


def _kind(kind) -> ScenarioKind:
    try:
        return ScenarioKind(kind)
    except ValueError:
        raise ValueError(f"scenario kind {kind!r} is unknown; accepted: "
                         f"{', '.join(k.value for k in ScenarioKind)}") from None


def _check_pair(train: Dataset, test: Dataset) -> None:
    if train.num_classes != test.num_classes or train.x.shape[1:] != test.x.shape[1:]:
        raise ValueError(f"train {train.name!r} ({train.num_classes} classes, {train.x.shape[1:]}) and test "
                         f"{test.name!r} ({test.num_classes} classes, {test.x.shape[1:]}) differ; accepted: "
                         f"the same class count and input shape")


def _task_sizes(n_tasks: int, classes_per_task, num_classes: int) -> list[int]:
    if classes_per_task is None:
        if num_classes % n_tasks:
            raise ValueError(f"n_tasks={n_tasks} does not divide the {num_classes} classes; accepted: a divisor "
                             f"of {num_classes}, or classes_per_task")
        return [num_classes // n_tasks] * n_tasks
    sizes = [int(classes_per_task)] * n_tasks if np.ndim(classes_per_task) == 0 else [int(s) for s in classes_per_task]
    if len(sizes) != n_tasks or min(sizes) < 1 or sum(sizes) > num_classes:
        raise ValueError(f"classes_per_task={classes_per_task!r} with n_tasks={n_tasks}; accepted: an int or "
                         f"{n_tasks} ints, each >= 1, in all at most the {num_classes} classes")
    return sizes


def _class_order(class_order, num_classes: int, seed: int) -> tuple[int, ...]:
    if class_order is None:
        return tuple(range(num_classes))
    if isinstance(class_order, str):
        if class_order != "random":
            raise ValueError(f"class_order={class_order!r}; accepted: None, 'random' or a permutation of the classes")
        return tuple(int(c) for c in np.random.default_rng(seed).permutation(num_classes))
    order = tuple(int(c) for c in class_order)
    if sorted(order) != list(range(num_classes)):
        raise ValueError(f"class_order={order}; accepted: a permutation of 0..{num_classes - 1}")
    return order


def _subset(dataset: Dataset, mask: np.ndarray, name: str) -> Dataset:
    return Dataset(name, dataset.x[mask], dataset.y[mask], dataset.num_classes)
