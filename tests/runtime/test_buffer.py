"""The replay buffer: reservoir invariants and statistics, determinism, checkpoints, byte budget, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecl.runtime.buffer import ReplayBuffer, bytes_per_example
from edgecl.runtime.errors import BatchError

SHAPE = (1, 2, 2)
K = 3


def stream(ids: np.ndarray, task: int = 0):
    """A batch whose every value encodes the example's id, so stored rows can be traced back."""
    ids = np.asarray(ids, np.int64)
    x = np.broadcast_to(ids[:, None, None, None], (len(ids), *SHAPE)).astype(np.float32)
    logits = np.broadcast_to(ids[:, None], (len(ids), K)).astype(np.float32) * -1
    return x, ids % K, logits


def fill(buffer: ReplayBuffer, sizes, start: int = 0, task: int = 0) -> int:
    for n in sizes:
        x, y, logits = stream(np.arange(start, start + n), task)
        buffer.add(x, y, logits if buffer.store_logits else None, task=task)
        start += n
    return start


def stored_ids(buffer: ReplayBuffer) -> np.ndarray:
    return buffer.x[: len(buffer), 0, 0, 0].astype(np.int64)


def chi2_upper(df: int, z: float = 3.72) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at normal score z (3.72: 1e-4)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


# --- invariants ---------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, 20), sizes=st.lists(st.integers(0, 30), max_size=12), seed=st.integers(0, 2**32 - 1),
       store_logits=st.booleans())
def test_capacity_never_exceeded_and_contents_are_consistent(capacity, sizes, seed, store_logits):
    buffer = ReplayBuffer(capacity, SHAPE, K, np.random.default_rng(seed), store_logits=store_logits)
    nbytes = buffer.nbytes
    total = 0
    for n in sizes:
        total = fill(buffer, [n], start=total, task=total % 7)
        assert buffer.seen == total
        assert len(buffer) == min(total, capacity) <= capacity
        assert buffer.nbytes == nbytes  # preallocated: never grows
        ids = stored_ids(buffer)
        assert len(np.unique(ids)) == len(ids)  # an example is stored at most once
        assert ((ids >= 0) & (ids < total)).all()  # ... and only examples that were offered
        np.testing.assert_array_equal(buffer.y[: len(buffer)], ids % K)  # rows stay whole
        if store_logits:
            np.testing.assert_array_equal(buffer.logits[: len(buffer)], -np.repeat(ids[:, None], K, 1))
    if total <= capacity:
        np.testing.assert_array_equal(stored_ids(buffer), np.arange(total))  # filling keeps everything


@settings(max_examples=40, deadline=None)
@given(capacity=st.integers(1, 15), seed=st.integers(0, 2**32 - 1),
       cuts=st.lists(st.integers(0, 60), max_size=8))
def test_contents_do_not_depend_on_how_the_stream_is_cut(capacity, seed, cuts):
    total = 60
    sizes = np.diff([0, *sorted(cuts), total]).tolist()
    one = ReplayBuffer(capacity, SHAPE, K, np.random.default_rng(seed))
    many = ReplayBuffer(capacity, SHAPE, K, np.random.default_rng(seed))
    fill(one, [1] * total)
    fill(many, sizes)
    np.testing.assert_array_equal(one.x, many.x)
    assert one.rng.bit_generator.state == many.rng.bit_generator.state


def test_task_ids_are_stored_per_example():
    buffer = ReplayBuffer(10, SHAPE, K, np.random.default_rng(0))
    x, y, logits = stream(np.arange(4))
    buffer.add(x[:2], y[:2], logits[:2], task=3)
    buffer.add(x[2:], y[2:], logits[2:], task=np.array([5, 6]))
    np.testing.assert_array_equal(buffer.task[:4], [3, 3, 5, 6])
    assert buffer.task.dtype == np.int16


# --- reservoir statistics -------------------------------------------------------

def test_every_example_is_kept_with_probability_capacity_over_seen():
    # 10 000 examples into capacity 100 over 300 fixed seeds, in batches of 64 (which cross
    # the point where the buffer fills). Each example is kept with p = 0.01; counts pooled in
    # 50 bins of 200 consecutive examples expect 600 each; chi-square with 49 df.
    capacity, total, runs, bins = 100, 10_000, 300, 50
    counts = np.zeros(total, np.int64)
    for seed in range(runs):
        buffer = ReplayBuffer(capacity, SHAPE, K, np.random.default_rng(seed), store_logits=False)
        fill(buffer, [64] * (total // 64) + [total % 64])
        np.add.at(counts, stored_ids(buffer), 1)
    assert counts.sum() == runs * capacity
    observed = counts.reshape(bins, -1).sum(1)
    expected = runs * capacity / bins
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < chi2_upper(bins - 1), (chi2, observed)
    assert chi2 > chi2_upper(bins - 1, z=-3.72), (chi2, observed)  # not suspiciously even either


def test_first_examples_are_not_favoured_or_penalised():
    # Capacity 2, 20 examples, 20 000 seeds: each example is kept with p = 0.1 (2 000 times,
    # sd ~ 42). Drawing j from [0, i) instead of [0, i] would keep the first two only ~1 050 times.
    capacity, total, runs = 2, 20, 20_000
    counts = np.zeros(total, np.int64)
    for seed in range(runs):
        buffer = ReplayBuffer(capacity, SHAPE, K, np.random.default_rng(seed), store_logits=False)
        fill(buffer, [total])
        counts[stored_ids(buffer)] += 1
    p = capacity / total
    sd = math.sqrt(runs * p * (1 - p))
    assert np.abs(counts - runs * p).max() < 5 * sd, counts


def test_sample_is_uniform_without_replacement():
    buffer = ReplayBuffer(10, SHAPE, K, np.random.default_rng(0))
    fill(buffer, [10])
    hits = np.zeros(10, np.int64)
    for _ in range(4000):
        x, y, logits, task, idx = buffer.sample(3)
        assert len(np.unique(idx)) == 3
        np.testing.assert_array_equal(x[:, 0, 0, 0], idx)  # rows match the returned slots
        np.testing.assert_array_equal(y, idx % K)
        np.testing.assert_array_equal(logits, buffer.logits[idx])
        hits[idx] += 1
    chi2 = float(((hits - 1200) ** 2 / 1200).sum())
    assert chi2 < chi2_upper(9), hits


def test_sample_returns_copies_and_types():
    buffer = ReplayBuffer(5, SHAPE, K, np.random.default_rng(0), store_logits=False)
    fill(buffer, [3])
    x, y, logits, task, idx = buffer.sample(3)
    assert (x.dtype, y.dtype, task.dtype, idx.dtype) == (np.float32, np.int64, np.int16, np.int64)
    assert logits is None
    x[:] = -1
    assert (buffer.x[:3] >= 0).all()
    assert buffer.sample(0)[0].shape == (0, *SHAPE)


# --- determinism and checkpoints ----------------------------------------------------

def test_same_seed_same_buffer_and_samples():
    def run(seed):
        buffer = ReplayBuffer(50, SHAPE, K, np.random.default_rng(seed))
        fill(buffer, [37] * 20)
        return buffer.x.copy(), buffer.sample(16)[4]

    (xa, sa), (xb, sb), (xc, _) = run(7), run(7), run(8)
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(sa, sb)
    assert not np.array_equal(xa, xc)


@pytest.mark.parametrize("store_logits", [True, False])
@pytest.mark.parametrize("bit_generator", [np.random.PCG64, np.random.MT19937, np.random.Philox])
def test_state_round_trip_continues_identically(tmp_path, store_logits, bit_generator):
    original = ReplayBuffer(40, SHAPE, K, np.random.Generator(bit_generator(3)), store_logits=store_logits)
    start = fill(original, [25] * 10)
    np.savez(tmp_path / "ckpt.npz", **original.state_arrays())

    with np.load(tmp_path / "ckpt.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    resumed = ReplayBuffer(40, SHAPE, K, np.random.Generator(bit_generator(999)), store_logits=store_logits)
    resumed.load_state_arrays(arrays)
    assert resumed.seen == original.seen == 250 and len(resumed) == 40

    for buffer in (original, resumed):
        fill(buffer, [25] * 10, start=start, task=1)
    np.testing.assert_array_equal(original.x, resumed.x)
    np.testing.assert_array_equal(original.task, resumed.task)
    for a, b in zip(original.sample(20), resumed.sample(20)):
        np.testing.assert_array_equal(a, b)


def test_state_of_a_partly_filled_buffer_is_only_the_filled_part():
    buffer = ReplayBuffer(100, SHAPE, K, np.random.default_rng(0))
    fill(buffer, [30])
    arrays = buffer.state_arrays()
    assert arrays["buffer::x"].shape == (30, *SHAPE) and int(arrays["buffer::seen"]) == 30


def test_load_refuses_a_state_of_another_geometry_and_leaves_the_buffer_as_it_was():
    source = ReplayBuffer(40, SHAPE, K, np.random.default_rng(0))
    fill(source, [100])
    target = ReplayBuffer(20, SHAPE, K, np.random.default_rng(1))
    fill(target, [5])
    before = target.x.copy(), target.seen, target.rng.bit_generator.state
    with pytest.raises(ValueError, match=r"buffer::x is float32 \(40, 1, 2, 2\); accepted: float32 \(20, 1, 2, 2\)"):
        target.load_state_arrays(source.state_arrays())
    ids_only = {k: v for k, v in source.state_arrays().items() if k != "buffer::logits"}
    with pytest.raises(ValueError, match="lacks buffer::logits"):
        target.load_state_arrays(ids_only)
    no_logits = ReplayBuffer(40, SHAPE, K, np.random.default_rng(1), store_logits=False)
    with pytest.raises(ValueError, match="store_logits=False"):
        no_logits.load_state_arrays(source.state_arrays())
    mt = ReplayBuffer(40, SHAPE, K, np.random.Generator(np.random.MT19937(0)))
    with pytest.raises(ValueError, match="MT19937"):
        mt.load_state_arrays(source.state_arrays())
    np.testing.assert_array_equal(target.x, before[0])
    assert (target.seen, target.rng.bit_generator.state) == before[1:]


# --- byte budget ----------------------------------------------------------------------

def test_bytes_per_example_on_literal_numbers():
    assert bytes_per_example((1, 8, 8), 10) == 4 * 64 + 8 + 4 * 10 + 2 == 306
    assert bytes_per_example((1, 8, 8), 10, store_logits=False) == 266
    assert bytes_per_example((3, 32, 32), 10) == 12288 + 8 + 40 + 2 == 12338


def test_from_bytes_capacity_is_budget_over_bytes_per_example():
    rng = np.random.default_rng(0)
    buffer = ReplayBuffer.from_bytes(100_000, (1, 8, 8), 10, rng)
    assert buffer.capacity == 100_000 // 306 == 326
    assert buffer.nbytes == 326 * 306 <= 100_000
    assert ReplayBuffer.from_bytes(306, (1, 8, 8), 10, rng).capacity == 1
    assert ReplayBuffer.from_bytes(611, (1, 8, 8), 10, rng).capacity == 1
    assert ReplayBuffer.from_bytes(612, (1, 8, 8), 10, rng).capacity == 2


def test_from_bytes_refuses_a_budget_below_one_example():
    with pytest.raises(ValueError, match="305 bytes cannot hold one example.*needs 306 bytes"):
        ReplayBuffer.from_bytes(305, (1, 8, 8), 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="budget_bytes=-1"):
        ReplayBuffer.from_bytes(-1, (1, 8, 8), 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="budget_bytes='2 MeB'.*not understood"):
        ReplayBuffer.from_bytes("2 MeB", (1, 8, 8), 10, np.random.default_rng(0))


def test_from_bytes_takes_the_size_strings_of_plan_memory():
    rng = np.random.default_rng(0)
    assert ReplayBuffer.from_bytes("2MiB", (1, 8, 8), 10, rng).capacity == 2 * 1024**2 // 306
    assert ReplayBuffer.from_bytes("100kB", (1, 8, 8), 10, rng).capacity == 100_000 // 306


def test_take_changed_names_the_slots_written_since_the_last_call():
    buffer = ReplayBuffer(4, SHAPE, K, np.random.default_rng(0), store_logits=False)
    assert fill(buffer, [3]) == 3
    assert buffer.take_changed().tolist() == [0, 1, 2]
    assert buffer.take_changed().tolist() == []
    fill(buffer, [50], start=3)  # full after one more: the rest replace random slots
    changed = buffer.take_changed()
    assert 3 in changed and set(changed.tolist()) <= {0, 1, 2, 3}


# --- errors -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(capacity=0), "capacity=0; accepted: an integer >= 1"),
    (dict(capacity=2.5), "capacity=2.5"),
    (dict(sample_shape=(1, 0)), r"sample_shape=\(1, 0\)"),
    (dict(num_classes=0), "num_classes=0"),
    (dict(rng=np.random.RandomState(0)), "rng is a RandomState; accepted: a np.random.Generator"),
    (dict(rng=0), "rng is a int"),
])
def test_constructor_errors(kwargs, message):
    args = dict(capacity=4, sample_shape=SHAPE, num_classes=K, rng=np.random.default_rng(0)) | kwargs
    with pytest.raises(ValueError, match=message):
        ReplayBuffer(**args)


def _bad(**changes):
    x, y, logits = stream(np.arange(4))
    args = dict(x=x, y=y, logits=logits, task=0) | changes
    return args


@pytest.mark.parametrize("args, message", [
    (_bad(x=np.zeros((4, 1, 2), np.float32)), r"x has shape \(4, 1, 2\); accepted: \(N, 1, 2, 2\)"),
    (_bad(x=[[0.0]]), "x has shape list"),
    (_bad(x=np.zeros((4, *SHAPE), np.float64)), "x is float64; accepted: a float32"),
    (_bad(x=np.full((4, *SHAPE), np.nan, np.float32)), r"x\[0, 0, 0, 0\] is nan; accepted: finite"),
    (_bad(y=np.zeros(3, np.int64)), r"y is int64 \(3,\); accepted: an integer numpy array of shape \(4,\)"),
    (_bad(y=np.zeros(4, np.float32)), "y is float32"),
    (_bad(y=np.array([0, 1, 3, 0])), r"y\[2\] = 3 is out of range; accepted: labels in \[0, 2\]"),
    (_bad(y=np.array([0, -1, 0, 0])), r"y\[1\] = -1 is out of range"),
    (_bad(logits=None), "logits is None but this buffer stores logits"),
    (_bad(logits=np.zeros((4, 2), np.float32)), r"logits.shape is \(4, 2\); accepted: \(4, 3\)"),
    (_bad(logits=np.array([[0, 0, np.inf]] * 4, np.float32)), r"logits\[0, 2\] is inf"),
    (_bad(task=-1), r"task\[0\] = -1 is out of range; accepted: task ids in \[0, 32767\]"),
    (_bad(task=40_000), "40000 is out of range"),
    (_bad(task=np.zeros(3, np.int64)), r"task is int64 \(3,\); accepted: an int or an integer array of shape \(4,\)"),
    (_bad(task=1.0), "task is 1.0"),
])
def test_add_errors_name_the_value_and_leave_the_buffer_untouched(args, message):
    buffer = ReplayBuffer(4, SHAPE, K, np.random.default_rng(0))
    fill(buffer, [6])
    before = buffer.x.copy(), buffer.seen, buffer.rng.bit_generator.state
    with pytest.raises(BatchError, match=message):
        buffer.add(**args)
    np.testing.assert_array_equal(buffer.x, before[0])
    assert (buffer.seen, buffer.rng.bit_generator.state) == before[1:]


def test_logits_refused_without_storage_and_sample_bounds():
    buffer = ReplayBuffer(4, SHAPE, K, np.random.default_rng(0), store_logits=False)
    x, y, logits = stream(np.arange(2))
    with pytest.raises(BatchError, match="store_logits=False; accepted: logits=None"):
        buffer.add(x, y, logits, task=0)
    buffer.add(x, y, task=0)
    with pytest.raises(ValueError, match=r"sample n=3; accepted: an integer in \[0, 2\]"):
        buffer.sample(3)
    with pytest.raises(ValueError, match="sample n=-1"):
        buffer.sample(-1)


def test_a_buffer_larger_than_the_machine_memory_is_refused_before_allocating():
    # 10**12 examples of 306 B: 278 TiB, more than any machine this runs on; numpy would raise
    # _ArrayMemoryError ("Unable to allocate") or, below the overcommit limit, the OOM killer would strike later
    with pytest.raises(ValueError, match=r"a replay buffer of capacity=1000000000000 examples \(306 B each\) is "
                                         r"306,000,000,000,000 B \(278.31 TiB\), more than this machine has: .* "
                                         r"available of .* total; accepted: capacity <= [\d,]+ examples"):
        ReplayBuffer(10**12, (1, 8, 8), 10, np.random.default_rng(0))
