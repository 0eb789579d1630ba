"""Replay buffer: reservoir sampling of raw inputs, labels, logits and task ids in preallocated arrays.

The buffer of ER and DER++ (Buzzega et al., NeurIPS 2020, "Dark Experience for General
Continual Learning") as SparCL uses it: every example of the stream has the same chance
`capacity / seen` to be in the buffer (Vitter, ACM TOMS 1985, "Random Sampling with a
Reservoir", algorithm R). Storage is allocated once, at construction, so the buffer never
grows past its byte budget.
"""

from __future__ import annotations

import json
import math

import numpy as np

from .errors import BatchError
from .memory import check_fits
from .sizes import parse_bytes

X_DTYPE = np.dtype(np.float32)
Y_DTYPE = np.dtype(np.int64)
LOGITS_DTYPE = np.dtype(np.float32)
# int16 holds 32 768 task ids, far more than any continual-learning stream, at half of int32's bytes.
TASK_DTYPE = np.dtype(np.int16)
MAX_TASK = int(np.iinfo(TASK_DTYPE).max)


def bytes_per_example(sample_shape: tuple[int, ...], num_classes: int, store_logits: bool = True) -> int:
    """Bytes one stored example takes: input + label + logits (if stored) + task id.

    Args:
        sample_shape: shape of one input without the batch dimension, e.g. (1, 8, 8).
        num_classes: width K of the logits.
        store_logits: whether the logits are kept (DER++ needs them, ER does not).
    Returns:
        bytes per example, e.g. 4*64 + 8 + 4*10 + 2 = 306 for (1, 8, 8) and K = 10.
    Raises:
        ValueError: a non-positive dimension or number of classes.
    """
    sample_shape = _check_shape(sample_shape)
    num_classes = _check_classes(num_classes)
    size = math.prod(sample_shape) * X_DTYPE.itemsize + Y_DTYPE.itemsize + TASK_DTYPE.itemsize
    if store_logits:
        size += num_classes * LOGITS_DTYPE.itemsize
    return size


class ReplayBuffer:
    """A fixed-capacity reservoir of (x, y, logits, task) examples.

    The contents depend only on the stream of examples and the generator's seed, not on how
    the stream is cut into batches.

    Args:
        capacity: number of examples the buffer holds (>= 1).
        sample_shape: shape of one input without the batch dimension.
        num_classes: width K of the logits and range of the labels [0, K).
        rng: the generator for insertion and sampling; its state is saved with the buffer.
        store_logits: keep float32 logits (N, K) per example (DER++); False saves 4 K bytes
            per example (ER).
    Raises:
        ValueError: capacity < 1, a bad shape or class count, rng not a np.random.Generator, or
            storage larger than the machine's available memory (checked before allocating).
    """

    def __init__(self, capacity: int, sample_shape: tuple[int, ...], num_classes: int,
                 rng: np.random.Generator, store_logits: bool = True):
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
            raise ValueError(f"capacity={capacity!r}; accepted: an integer >= 1 (examples)")
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng is a {type(rng).__name__}; accepted: a np.random.Generator "
                             "(e.g. np.random.default_rng(seed))")
        self.capacity = int(capacity)
        self.sample_shape = _check_shape(sample_shape)
        self.num_classes = _check_classes(num_classes)
        self.store_logits = bool(store_logits)
        per_example = bytes_per_example(self.sample_shape, self.num_classes, self.store_logits)
        check_fits(f"a replay buffer of capacity={self.capacity} examples ({per_example} B each)",
                   self.capacity * per_example, "capacity", per_example, "examples")
        self.rng = rng
        self.seen = 0
        self.x = np.zeros((self.capacity, *self.sample_shape), X_DTYPE)
        self.y = np.zeros(self.capacity, Y_DTYPE)
        self.logits = np.zeros((self.capacity, self.num_classes if self.store_logits else 0), LOGITS_DTYPE)
        self.task = np.zeros(self.capacity, TASK_DTYPE)
        self.changed = np.zeros(self.capacity, bool)  # slots written since `take_changed` (incremental saves)

    @classmethod
    def from_bytes(cls, budget_bytes: int | str, sample_shape: tuple[int, ...], num_classes: int,
                   rng: np.random.Generator, store_logits: bool = True) -> ReplayBuffer:
        """The largest buffer whose storage fits in `budget_bytes`.

        Args:
            budget_bytes: bytes available for the buffer's arrays: an int, or a size such as "2MiB"
                (`edgecl.runtime.parse_bytes`, as everywhere a budget is taken).
            sample_shape, num_classes, rng, store_logits: as in the constructor.
        Returns:
            a buffer of capacity budget_bytes // bytes_per_example(...).
        Raises:
            ValueError: the budget is negative or smaller than one example (the message
                names the bytes one example needs).
        """
        try:
            budget_bytes = parse_bytes(budget_bytes)
        except ValueError as e:
            raise ValueError(f"budget_bytes={budget_bytes!r}: {e}") from None
        per_example = bytes_per_example(sample_shape, num_classes, store_logits)
        capacity = int(budget_bytes) // per_example
        if capacity < 1:
            raise ValueError(f"a replay buffer budget of {int(budget_bytes)} bytes cannot hold one example: "
                             f"one example of shape {tuple(sample_shape)} with {num_classes} classes needs "
                             f"{per_example} bytes; accepted: budget_bytes >= {per_example}")
        return cls(capacity, sample_shape, num_classes, rng, store_logits)

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    @property
    def nbytes(self) -> int:
        """Bytes of the preallocated storage (capacity * bytes per example)."""
        return self.x.nbytes + self.y.nbytes + self.logits.nbytes + self.task.nbytes

    def add(self, x: np.ndarray, y: np.ndarray, logits: np.ndarray | None = None, *,
            task: int | np.ndarray) -> None:
        """Offer a batch to the reservoir; each example is kept with probability capacity / seen.

        Args:
            x: float32 (N, *sample_shape), finite. N may be 0.
            y: integer (N,) labels in [0, num_classes).
            logits: float32 (N, num_classes), finite; required if the buffer stores logits,
                refused if it does not.
            task: task id of the batch (an int) or of every example (integer (N,)), in [0, 32767].
        Raises:
            BatchError: bad shape, dtype, range or a non-finite value; the buffer is untouched.
        """
        x, y, logits, task = self._check_batch(x, y, logits, task)
        n = len(x)
        # Algorithm R: example number i (0-based over the whole stream) goes to slot i while the
        # buffer fills, afterwards to slot j ~ U{0..i} if j < capacity. One vectorised draw over
        # the batch consumes the generator exactly as one draw per example would.
        positions = self.seen + np.arange(n, dtype=np.int64)
        slots = positions.copy()
        full = positions >= self.capacity
        if full.any():
            slots[full] = self.rng.integers(0, positions[full] + 1)
        rows = np.flatnonzero(slots < self.capacity)
        slots = slots[rows]
        # A slot hit twice in one batch keeps the later example, as a sequential stream would.
        _, last = np.unique(slots[::-1], return_index=True)
        keep = rows[len(rows) - 1 - last]
        target = slots[len(rows) - 1 - last]
        self.x[target] = x[keep]
        self.y[target] = y[keep]
        self.task[target] = task[keep]
        if self.store_logits:
            self.logits[target] = logits[keep]
        self.changed[target] = True
        self.seen += n

    def take_changed(self) -> np.ndarray:
        """The slots written since the last call (sorted int64), and forget them: what an incremental
        save (`edgecl.runtime.buffer_log`) appends."""
        slots = np.flatnonzero(self.changed)
        self.changed[:] = False
        return slots

    def sample(self, n: int, rng: np.random.Generator | None = None):
        """Draw n distinct stored examples uniformly (without replacement).

        Args:
            n: number of examples, 0 <= n <= len(self).
            rng: generator for this draw; default the buffer's own.
        Returns:
            (x float32 (n, *sample_shape), y int64 (n,), logits float32 (n, K) or None if the
            buffer stores no logits, task int16 (n,), indices int64 (n,) slots in the buffer),
            all copies.
        Raises:
            ValueError: n is negative or larger than the number of stored examples.
        """
        size = len(self)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= size:
            raise ValueError(f"sample n={n!r}; accepted: an integer in [0, {size}] (examples stored)")
        rng = self.rng if rng is None else rng
        indices = rng.choice(size, size=int(n), replace=False).astype(np.int64)
        logits = self.logits[indices] if self.store_logits else None
        return self.x[indices], self.y[indices], logits, self.task[indices], indices

    def map_inputs(self, fn, sample_shape: tuple[int, ...], batch_size: int = 256) -> None:
        """Store inputs of `sample_shape` from now on: each stored input x becomes fn(x) (latent replay's
        freeze: the raw inputs become their latents); fn=None leaves the new storage zero, for a
        `load_state_arrays` that follows. Labels, logits, task ids, `seen` and the generator stay.

        Raises:
            ValueError: a bad shape, storage the machine cannot hold, or fn's output not finite float32
                (n, *sample_shape); the buffer is unchanged.
        """
        sample_shape = _check_shape(sample_shape)
        per_example = bytes_per_example(sample_shape, self.num_classes, self.store_logits)
        check_fits(f"a replay buffer of capacity={self.capacity} examples ({per_example} B each)",
                   self.capacity * per_example, "capacity", per_example, "examples")
        x = np.zeros((self.capacity, *sample_shape), X_DTYPE)
        for i in range(0, len(self) if fn is not None else 0, batch_size):
            out = fn(self.x[i : i + batch_size])
            try:
                x[i : i + batch_size] = _check_float("the mapped inputs", out, (len(out), *sample_shape))
            except BatchError as e:
                raise ValueError(str(e)) from None
        self.x, self.sample_shape = x, sample_shape
        self.changed[: len(self)] = True

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Flat `buffer::<name>` arrays for a checkpoint: stored examples, `seen` and the generator state."""
        size = len(self)
        rng_state = json.dumps(_encode(self.rng.bit_generator.state)).encode()
        out = {
            "buffer::x": self.x[:size].copy(),
            "buffer::y": self.y[:size].copy(),
            "buffer::task": self.task[:size].copy(),
            "buffer::seen": np.array(self.seen, np.int64),
            "buffer::rng": np.frombuffer(rng_state, dtype=np.uint8).copy(),
        }
        if self.store_logits:
            out["buffer::logits"] = self.logits[:size].copy()
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore a state written by `state_arrays` of a buffer with the same geometry.

        The generator passed at construction is set to the saved state, so a resumed run
        inserts and samples exactly as the original one would have.

        Raises:
            ValueError: a missing array, or arrays of another capacity, shape, class count or
                logits setting; the buffer is left as it was.
        """
        arrays_needed = ["x", "y", "task"] + (["logits"] if self.store_logits else [])
        missing = [f"buffer::{k}" for k in arrays_needed + ["seen", "rng"] if f"buffer::{k}" not in arrays]
        if missing:
            raise ValueError(f"buffer state lacks {', '.join(missing)}; accepted: the arrays of "
                             f"ReplayBuffer.state_arrays() of a buffer with store_logits={self.store_logits}")
        if not self.store_logits and "buffer::logits" in arrays:
            raise ValueError("buffer state holds logits but this buffer has store_logits=False; "
                             "build it with store_logits=True to restore this state")
        seen = int(np.asarray(arrays["buffer::seen"]))
        if seen < 0:
            raise ValueError(f"buffer state has seen={seen}; accepted: >= 0")
        size = min(seen, self.capacity)
        expected = {"x": ((size, *self.sample_shape), X_DTYPE), "y": ((size,), Y_DTYPE),
                    "task": ((size,), TASK_DTYPE), "logits": ((size, self.num_classes), LOGITS_DTYPE)}
        for name in arrays_needed:
            a = np.asarray(arrays[f"buffer::{name}"])
            shape, dtype = expected[name]
            if a.shape != shape or a.dtype != dtype:
                raise ValueError(f"buffer state buffer::{name} is {a.dtype} {a.shape}; accepted: {dtype} {shape} "
                                 f"(capacity {self.capacity}, seen {seen})")
        try:
            state = _decode(json.loads(np.asarray(arrays["buffer::rng"], np.uint8).tobytes().decode()))
            probe = type(self.rng.bit_generator)()
            probe.state = state  # validates the state before the live generator is touched
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
            raise ValueError(f"buffer state buffer::rng does not fit a {type(self.rng.bit_generator).__name__} "
                             f"generator: {e}") from e
        self.rng.bit_generator.state = state
        self.seen = seen
        self.x[:size] = arrays["buffer::x"]
        self.y[:size] = arrays["buffer::y"]
        self.task[:size] = arrays["buffer::task"]
        if self.store_logits:
            self.logits[:size] = arrays["buffer::logits"]
        self.changed[:] = False
        self.changed[:size] = True

    def _check_batch(self, x, y, logits, task):
        shape = ", ".join(map(str, self.sample_shape))
        if not isinstance(x, np.ndarray) or x.ndim != 1 + len(self.sample_shape) or x.shape[1:] != self.sample_shape:
            got = x.shape if isinstance(x, np.ndarray) else type(x).__name__
            raise BatchError(f"x has shape {got}; accepted: (N, {shape})")
        n = len(x)
        x = _check_float("x", x, (n, *self.sample_shape))
        if not isinstance(y, np.ndarray) or not np.issubdtype(y.dtype, np.integer) or y.shape != (n,):
            got = f"{y.dtype} {y.shape}" if isinstance(y, np.ndarray) else type(y).__name__
            raise BatchError(f"y is {got}; accepted: an integer numpy array of shape ({n},), one label per row of x")
        bad = (y < 0) | (y >= self.num_classes)
        if bad.any():
            i = int(np.argmax(bad))
            raise BatchError(f"y[{i}] = {int(y[i])} is out of range; accepted: labels in [0, {self.num_classes - 1}]")
        if self.store_logits and logits is None:
            raise BatchError("logits is None but this buffer stores logits (DER++); pass float32 logits "
                             f"({n}, {self.num_classes}) or build the buffer with store_logits=False")
        if not self.store_logits and logits is not None:
            raise BatchError("logits were passed but this buffer has store_logits=False; accepted: logits=None")
        if logits is not None:
            logits = _check_float("logits", logits, (n, self.num_classes))
        task = self._check_task(task, n)
        return x, y, logits, task

    def _check_task(self, task, n: int) -> np.ndarray:
        if isinstance(task, (int, np.integer)) and not isinstance(task, bool):
            task = np.full(n, int(task), np.int64)
        elif not (isinstance(task, np.ndarray) and np.issubdtype(task.dtype, np.integer) and task.shape == (n,)):
            got = f"{task.dtype} {task.shape}" if isinstance(task, np.ndarray) else repr(task)
            raise BatchError(f"task is {got}; accepted: an int or an integer array of shape ({n},)")
        bad = (task < 0) | (task > MAX_TASK)
        if bad.any():
            i = int(np.argmax(bad))
            raise BatchError(f"task[{i}] = {int(task[i])} is out of range; accepted: task ids in [0, {MAX_TASK}]")
        return task


def _check_float(name: str, a: np.ndarray, shape: tuple) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype != np.float32:
        got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
        raise BatchError(f"{name} is {got}; accepted: a float32 numpy array of shape {shape} "
                         "(convert with .astype(np.float32))")
    if a.shape != shape:
        raise BatchError(f"{name}.shape is {a.shape}; accepted: {shape}")
    finite = np.isfinite(a)
    if not finite.all():
        bad = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise BatchError(f"{name}{list(bad)} is {float(a[bad])}; accepted: finite values only")
    return a


def _check_shape(sample_shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in sample_shape)
    except (TypeError, ValueError):
        raise ValueError(f"sample_shape={sample_shape!r}; accepted: a tuple of positive ints, e.g. (1, 8, 8)") from None
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"sample_shape={sample_shape!r}; accepted: a non-empty tuple of positive ints, e.g. (1, 8, 8)")
    return shape


def _check_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}; accepted: an integer >= 1")
    return int(num_classes)


def _encode(value):
    """A bit generator's state as JSON-ready values (ints stay exact; arrays keep their dtype)."""
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.integer):
        return int(value)
    return value


def _decode(value):
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return np.array(value["__ndarray__"], dtype=value["dtype"])
        return {k: _decode(v) for k, v in value.items()}
    return value
