"""A fleet's data: each device its own non-IID class-incremental stream, cut from one data set.

The fleet meets the classes in tasks, as a product meets new classes over time: a seeded class
order cut into `n_tasks` tasks of equal size (Split Fashion-MNIST / digits: 5 tasks of 2 classes).
Each class's training examples are shared among the devices by a Dirichlet draw (Hsu et al. 2019,
"Measuring the effects of non-identical data distribution"): with concentration `alpha` = 0.5
most devices hold a large share of a few classes and little or nothing of others, so the devices'
class subsets differ. Within a task each device meets its classes in an order of its own (a seeded
permutation per device), overlapping: its examples are sorted by rank of their class in that order
+ OVERLAP * U(0, 1), so the first class comes mostly first and the next one starts arriving while
the first still does (a hard class-by-class order would leave a single class per round). Rounds of the
federation cut each task into `rounds_per_task` equal parts: after round r a device has received
the first `arrived(r)` examples of its stream (the `client_stream` offsets say where).

Pure numpy: the host builds the scenario and writes each device's stream to its own file
(`write_client_files`); a device reads only its own (`ClientStream.load`).
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np

from edgecl.runtime.dataset import DataError, Dataset
from edgecl.runtime.files import write_atomic

OVERLAP = 2.0  # in class ranks: with 2 classes a task, the first half of a device's task is ~3/4 its first class


def _count(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r}; accepted: an integer >= {low}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class ClientStream:
    """One device's stream: x float32 (N, C, H, W), y int64 (N,) in arrival order; task_offsets int64
    (T + 1,): task t is rows task_offsets[t]:task_offsets[t + 1]."""

    x: np.ndarray
    y: np.ndarray
    task_offsets: np.ndarray

    @property
    def n_tasks(self) -> int:
        return len(self.task_offsets) - 1

    def arrived(self, server_round: int, rounds_per_task: int) -> int:
        """Examples received by the end of 1-based `server_round` (all of them past the last task)."""
        _count("server_round", server_round, 1)
        _count("rounds_per_task", rounds_per_task, 1)
        task, part = divmod(server_round - 1, rounds_per_task)
        if task >= self.n_tasks:
            return int(self.task_offsets[-1])
        lo, hi = int(self.task_offsets[task]), int(self.task_offsets[task + 1])
        return lo + (hi - lo) * (part + 1) // rounds_per_task

    def task_of(self, row: int) -> int:
        """The task of stream row `row`."""
        return int(np.searchsorted(self.task_offsets, row, side="right") - 1)

    def save(self, path: str | Path) -> None:
        """Atomic `.npz` (what a device is given)."""
        buf = io.BytesIO()
        np.savez(buf, x=self.x, y=self.y, task_offsets=self.task_offsets)
        write_atomic(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> ClientStream:
        """Read a stream `save` wrote.

        Raises:
            FileNotFoundError: no such file. DataError: not such a stream (names what is wrong).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"device stream {str(path)!r} does not exist")
        try:
            with np.load(path, allow_pickle=False) as z:
                x, y, offsets = z["x"], z["y"], z["task_offsets"]
        except Exception as e:  # zip, npy or missing-key errors: all mean a broken file
            raise DataError(f"device stream {str(path)!r} is unreadable: {e}") from e
        ok = (x.dtype == np.float32 and x.ndim == 4 and y.shape == (len(x),) and np.issubdtype(y.dtype, np.integer)
              and offsets.ndim == 1 and len(offsets) >= 2 and offsets[0] == 0 and offsets[-1] == len(x)
              and (np.diff(offsets) >= 0).all())
        if not ok:
            raise DataError(f"device stream {str(path)!r}: x {x.dtype} {x.shape}, y {y.dtype} {y.shape}, "
                            f"task_offsets {offsets.tolist()}; accepted: x float32 (N, C, H, W), y (N,) integers, "
                            "task_offsets rising from 0 to N")
        return cls(x, y.astype(np.int64), offsets.astype(np.int64))


@dataclasses.dataclass(frozen=True)
class FleetScenario:
    """The devices' streams and the fleet's tasks.

    task_classes: the classes of each fleet task (the accuracy matrix's columns).
    client_classes: client -> task -> the classes it meets there, in its order (may be fewer).
    """

    streams: tuple[ClientStream, ...]
    task_classes: tuple[tuple[int, ...], ...]
    client_classes: tuple[tuple[tuple[int, ...], ...], ...]
    test: Dataset
    alpha: float
    seed: int

    @property
    def n_clients(self) -> int:
        return len(self.streams)

    @property
    def n_tasks(self) -> int:
        return len(self.task_classes)

    def seen_classes(self, task: int) -> tuple[int, ...]:
        """The classes of tasks 0..task."""
        return tuple(c for t in range(task + 1) for c in self.task_classes[t])

    def summary(self) -> list[dict]:
        """Per device: examples per task and its classes (for the result's config)."""
        return [{"examples_per_task": np.diff(s.task_offsets).tolist(),
                 "classes_per_task": [list(c) for c in self.client_classes[k]]}
                for k, s in enumerate(self.streams)]


def dirichlet_fleet(train: Dataset, test: Dataset, n_clients: int, n_tasks: int = 5, alpha: float = 0.5,
                    seed: int = 0) -> FleetScenario:
    """Split `train` into `n_clients` class-incremental streams (module docstring).

    Args:
        train, test: one data set's splits (same classes and sample shape).
        n_clients: devices, >= 1. n_tasks: fleet tasks; the class count must divide by it.
        alpha: the Dirichlet concentration, > 0 (small: more skewed; large: near IID).
        seed: class order, shares and each device's orders.
    Raises:
        ValueError: a bad count, alpha, or class count not divisible by n_tasks.
    """
    _count("n_clients", n_clients, 1)
    _count("n_tasks", n_tasks, 1)
    _count("seed", seed, 0)
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha={alpha!r}; accepted: a finite number > 0 (the Dirichlet concentration)")
    k = train.num_classes
    if k % n_tasks:
        raise ValueError(f"{k} classes do not split into n_tasks={n_tasks} equal tasks; accepted: a divisor of {k}")
    if test.num_classes != k or test.x.shape[1:] != train.x.shape[1:]:
        raise ValueError(f"test set has {test.num_classes} classes of {test.x.shape[1:]}, train {k} of "
                         f"{train.x.shape[1:]}; accepted: two splits of one data set")
    rng = np.random.default_rng([seed, 7])
    order = rng.permutation(k)
    task_classes = tuple(tuple(int(c) for c in order[t * (k // n_tasks):(t + 1) * (k // n_tasks)])
                         for t in range(n_tasks))
    shares: dict[int, list[np.ndarray]] = {}  # class -> client -> its example indices
    for c in range(k):
        idx = rng.permutation(np.flatnonzero(train.y == c))
        p = rng.dirichlet(np.full(n_clients, float(alpha)))
        cuts = np.round(np.cumsum(p)[:-1] * len(idx)).astype(int)
        shares[c] = np.split(idx, cuts)
    streams, client_classes = [], []
    for client in range(n_clients):
        crng = np.random.default_rng([seed, 11, client])
        rows, offsets, met = [], [0], []
        for classes in task_classes:
            mine = [int(c) for c in crng.permutation(np.array(classes)) if len(shares[int(c)][client])]
            met.append(tuple(mine))
            task_rows = np.concatenate([shares[c][client] for c in mine]) if mine else np.zeros(0, np.int64)
            ranks = np.concatenate([np.full(len(shares[c][client]), r, np.float64) for r, c in enumerate(mine)]
                                   ) if mine else np.zeros(0)
            keys = ranks + OVERLAP * crng.random(len(task_rows))
            rows.append(task_rows[np.argsort(keys, kind="stable")])
            offsets.append(offsets[-1] + len(task_rows))
        at = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        streams.append(ClientStream(train.x[at], train.y[at].astype(np.int64), np.array(offsets, np.int64)))
        client_classes.append(tuple(met))
    return FleetScenario(tuple(streams), task_classes, tuple(client_classes), test, float(alpha), int(seed))


def write_client_files(scenario: FleetScenario, folder: str | Path) -> list[Path]:
    """Each device's stream to `folder/client-<k>.npz` and the test set to `folder/test.npz`.

    Returns:
        the device files, by client index.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, stream in enumerate(scenario.streams):
        path = folder / f"client-{k}.npz"
        stream.save(path)
        paths.append(path)
    test, buf = scenario.test, io.BytesIO()
    np.savez(buf, x=test.x, y=test.y, num_classes=np.int64(test.num_classes), name=np.array(test.name))
    write_atomic(folder / "test.npz", buf.getvalue())
    return paths
