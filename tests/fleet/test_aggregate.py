"""Masked FedAvg: hand-computed averages, zero counts, determinism, refusals, coverage."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from edgecl.fleet.aggregate import average_buffers, coverage_fraction, masked_average
from edgecl.fleet.codec import Update

GLOBAL = {"w": np.array([10, 10, 10, 10], np.float32)}
GLOBAL_BUFFERS = {"mean": np.array([0.5, -0.5], np.float32)}


def update(w, cover=None, buffer=(0.0, 0.0)) -> Update:
    return Update({"w": np.array(w, np.float32)}, {"w": None if cover is None else np.array(cover, bool)},
                  {"mean": np.array(buffer, np.float32)})


A = update([1, 2, 3, 4], [1, 1, 0, 0], buffer=(1, 2))
B = update([5, 6, 7, 8], [0, 1, 1, 0], buffer=(3, 6))
DENSE = update([2, 2, 2, 2], buffer=(5, 10))


def test_each_entry_is_the_count_weighted_mean_of_the_devices_that_trained_it():
    got = masked_average(GLOBAL, [A, B], [1, 3])
    # entry 0: A alone; 1: (1*2 + 3*6) / 4; 2: B alone; 3: nobody trained it: pruned by all, 0
    np.testing.assert_allclose(got["w"], [1, 5, 7, 0], rtol=0, atol=0)
    assert got["w"].dtype == np.float32


def test_a_dense_device_covers_every_entry():
    got = masked_average(GLOBAL, [A, B, DENSE], [1, 3, 4])
    expected = [(1 * 1 + 4 * 2) / 5, (1 * 2 + 3 * 6 + 4 * 2) / 8, (3 * 7 + 4 * 2) / 7, 2]
    np.testing.assert_allclose(got["w"], np.array(expected, np.float32), rtol=1e-7)


def test_dense_devices_alone_are_plain_fedavg():
    a, b = update([1, 2, 3, 4]), update([3, 0, 3, 8])
    got = masked_average(GLOBAL, [a, b], [3, 1])
    np.testing.assert_allclose(got["w"], [1.5, 1.5, 3, 5], rtol=0, atol=0)  # (3 a + b) / 4


def test_buffers_are_count_weighted_means():
    got = average_buffers(GLOBAL_BUFFERS, [A, B, DENSE], [1, 3, 4])
    np.testing.assert_allclose(got["mean"], [(1 + 9 + 20) / 8, (2 + 18 + 40) / 8], rtol=1e-7)


def test_a_device_with_no_examples_counts_for_nothing():
    got = masked_average(GLOBAL, [A, B], [0, 3])
    np.testing.assert_array_equal(got["w"], [0, 6, 7, 0])  # A's entry 0 is not averaged in
    np.testing.assert_array_equal(average_buffers(GLOBAL_BUFFERS, [A, B], [0, 3])["mean"], [3, 6])


def test_all_counts_zero_leave_the_global_model_unchanged():
    got = masked_average(GLOBAL, [A, B, DENSE], [0, 0, 0])
    np.testing.assert_array_equal(got["w"], GLOBAL["w"])
    buffers = average_buffers(GLOBAL_BUFFERS, [A, B, DENSE], [0, 0, 0])
    np.testing.assert_array_equal(buffers["mean"], GLOBAL_BUFFERS["mean"])
    buffers["mean"][:] = 7  # a copy: the caller's global buffers are not handed back
    got["w"][:] = 7
    assert GLOBAL_BUFFERS["mean"].tolist() == [0.5, -0.5] and GLOBAL["w"].tolist() == [10] * 4


def _random_round(seed):
    rng = np.random.default_rng(seed)
    glob = {"conv": rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "bias": rng.standard_normal(10).astype(np.float32)}
    updates = []
    for k in range(5):
        w = {n: rng.standard_normal(g.shape).astype(np.float32) for n, g in glob.items()}
        cover = {"conv": rng.random((4, 1, 3, 3)) < 0.3 if k % 2 else None, "bias": None}
        updates.append(Update(w, cover, {"mean": rng.standard_normal(4).astype(np.float32)}))
    counts = rng.integers(1, 200, 5).tolist()
    return glob, updates, counts, {"mean": np.zeros(4, np.float32)}


def test_devices_in_the_same_order_give_the_same_model_bit_for_bit():
    glob, updates, counts, buffers = _random_round(0)
    first = masked_average(glob, updates, counts) | average_buffers(buffers, updates, counts)
    again = _random_round(0)
    second = masked_average(again[0], copy.deepcopy(again[1]), list(again[2])) | average_buffers(again[3], again[1],
                                                                                                   again[2])
    assert first.keys() == second.keys() == {"conv", "bias", "mean"}
    for name in first:
        assert first[name].tobytes() == second[name].tobytes()
    # and it is the formula of the module docstring, summed in float64
    n = np.array(counts, np.float64)
    c = np.stack([n[k] * (np.ones((4, 1, 3, 3)) if u.coverage["conv"] is None else u.coverage["conv"])
                  for k, u in enumerate(updates)])
    w = np.stack([u.weights["conv"] for u in updates]).astype(np.float64)
    den = c.sum(0)
    expected = np.where(den > 0, (c * w).sum(0) / np.where(den > 0, den, 1), glob["conv"])
    np.testing.assert_allclose(first["conv"], expected.astype(np.float32), rtol=1e-6)


@pytest.mark.parametrize("counts", [[1, -1], [1, float("nan")], [float("inf"), 1], [1], [1, 2, 3], [[1, 2]], 5])
@pytest.mark.parametrize("average", [masked_average, average_buffers])
def test_bad_counts_are_a_value_error(average, counts):
    glob = GLOBAL if average is masked_average else GLOBAL_BUFFERS
    with pytest.raises(ValueError, match="count"):
        average(glob, [A, B], counts)


def test_coverage_fraction_is_the_share_some_device_trained():
    assert coverage_fraction([A, B], "w") == 0.75
    assert coverage_fraction([A], "w") == 0.5
    assert coverage_fraction([update([0] * 4, [0, 0, 0, 0])], "w") == 0.0
    assert coverage_fraction([A, DENSE], "w") == 1.0
    assert coverage_fraction([], "w") == 0.0
