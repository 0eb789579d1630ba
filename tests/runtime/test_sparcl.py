"""SparCL's TDM, DGM and DDR math on small literal arrays, and its invariants as properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgecl.runtime.sparcl import (
    DDRSchedule, DGM, ForgettingTracker, TDMSchedule, ddr_schedule, gradient_topk_mask, importance, initial_mask,
    keep_count, prune_and_regrow, select_removal, tdm_schedule, topk_mask,
)

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
densities = st.floats(0.0, 1.0, allow_nan=False)


def arrays(min_side=1, max_side=8):
    return hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=min_side, max_side=max_side),
                      elements=finite)


# --- topk_mask, importance, initial_mask, gradient_topk_mask ---------------------

def test_topk_mask_literal():
    np.testing.assert_array_equal(topk_mask(np.array([3, 1, 2, 0]), 0.5), [1, 0, 1, 0])
    np.testing.assert_array_equal(topk_mask(np.array([[0.1, -5.0], [7.0, 2.0]]), 0.25), [[0, 0], [1, 0]])
    assert topk_mask(np.array([3, 1, 2, 0]), 0.5).dtype == np.float32


def test_topk_mask_ties_keep_lower_index_and_round_half_up():
    np.testing.assert_array_equal(topk_mask(np.array([1, 1, 1, 1]), 0.5), [1, 1, 0, 0])
    np.testing.assert_array_equal(topk_mask(np.array([2, 5, 5, 1]), 0.25), [0, 1, 0, 0])
    assert keep_count(3, 0.5) == 2 and keep_count(5, 0.5) == 3 and keep_count(4, 0.1) == 0
    np.testing.assert_array_equal(topk_mask(np.array([1, 3, 2]), 0.5), [0, 1, 1])  # 1.5 -> 2


def test_topk_mask_edges_and_errors():
    np.testing.assert_array_equal(topk_mask(np.array([1.0, 2.0]), 0.0), [0, 0])
    np.testing.assert_array_equal(topk_mask(np.array([1.0, 2.0]), 1.0), [1, 1])
    np.testing.assert_array_equal(topk_mask(np.array([3, 1], np.uint8), 0.5), [1, 0])  # no unsigned wrap-around
    with pytest.raises(ValueError, match="density=1.5"):
        topk_mask(np.array([1.0]), 1.5)
    with pytest.raises(ValueError, match="non-finite"):
        topk_mask(np.array([1.0, np.nan]), 0.5)
    with pytest.raises(ValueError, match="empty"):
        topk_mask(np.array([]), 0.5)


@given(arrays(), densities)
def test_topk_mask_density_exact_and_keeps_the_largest(scores, density):
    mask = topk_mask(scores, density)
    assert mask.shape == scores.shape and mask.dtype == np.float32
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert int(mask.sum()) == keep_count(scores.size, density)
    kept, dropped = scores[mask == 1], scores[mask == 0]
    if kept.size and dropped.size:
        assert kept.min() >= dropped.max()


def test_importance_literal():
    w = np.array([1.0, -2.0, 0.0, 0.5])
    g = np.array([-4.0, 0.0, 2.0, 1.0])
    np.testing.assert_allclose(importance(w, g), [3.0, 2.0, 1.0, 1.0])
    np.testing.assert_allclose(importance(w, g, grad_coef=0.0), np.abs(w))
    with pytest.raises(ValueError, match="shapes differ"):
        importance(w, g[:3])
    with pytest.raises(ValueError, match="grad_coef=-1"):
        importance(w, g, grad_coef=-1)


def test_initial_mask_is_magnitude_topk():
    w = np.array([[0.1, -3.0], [2.0, 0.5]], np.float32)
    np.testing.assert_array_equal(initial_mask(w, 0.5, np.random.default_rng(0)), [[0, 1], [1, 0]])
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        initial_mask(w, 0.5, 0)


def test_initial_mask_breaks_ties_at_random_per_seed():
    w = np.zeros(100, np.float32)
    masks = [initial_mask(w, 0.25, np.random.default_rng(s)) for s in (1, 1, 2)]
    assert all(int(m.sum()) == 25 for m in masks)
    np.testing.assert_array_equal(masks[0], masks[1])
    assert not np.array_equal(masks[0], masks[2])
    assert not np.array_equal(masks[0], topk_mask(w, 0.25))  # not simply the first 25 entries


def test_gradient_topk_mask_literal():
    g = np.array([[0.1, -3.0, 0.0], [2.0, -0.5, 0.0]], np.float32)
    np.testing.assert_array_equal(gradient_topk_mask(g, 2 / 6), [[0, 1, 0], [1, 0, 0]])


# --- prune_and_regrow -----------------------------------------------------------

def test_prune_and_regrow_literal():
    w = np.array([0.9, 0.1, 0.8, 0.0, 0.7, 0.0, 0.0, 0.0], np.float32)
    g = np.zeros_like(w)
    mask = np.array([1, 1, 1, 0, 1, 0, 0, 0], np.float32)
    # target 4 active, keep floor(4 * 0.5) = 2 most important (0 and 2), regrow 2 of the old zeros {3, 5, 6, 7}
    new = prune_and_regrow(w, g, mask, 0.5, 0.5, np.random.default_rng(0))
    assert int(new.sum()) == 4 and new[0] == 1 and new[2] == 1
    assert new[1] == 0 and new[4] == 0  # pruned this round, not revived
    assert set(np.flatnonzero(new)) - {0, 2} <= {3, 5, 6, 7}


def test_prune_and_regrow_gradient_raises_importance():
    w = np.array([0.5, 0.4, 0.0, 0.0], np.float32)
    g = np.array([0.0, 1.0, 0.0, 0.0], np.float32)  # 0.4 + 0.5 * 1.0 beats 0.5
    new = prune_and_regrow(w, g, np.array([1, 1, 0, 0], np.float32), 0.5, 0.5, np.random.default_rng(0))
    assert new[1] == 1 and new[0] == 0


def test_prune_and_regrow_revives_just_pruned_only_when_needed():
    w = np.array([4.0, 3.0, 2.0, 1.0, 0.0], np.float32)
    mask = np.array([1, 1, 1, 1, 0], np.float32)
    # target 4, keep 2, regrow 2: one old zero (4) exists, so one of the pruned {2, 3} comes back
    new = prune_and_regrow(w, np.zeros_like(w), mask, 0.8, 0.5, np.random.default_rng(0))
    assert int(new.sum()) == 4 and new[0] == new[1] == new[4] == 1


def test_prune_and_regrow_errors():
    w = np.ones(4, np.float32)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="0 and 1"):
        prune_and_regrow(w, w, np.array([0, 2, 0, 1]), 0.5, 0.1, rng)
    with pytest.raises(ValueError, match="shapes differ"):
        prune_and_regrow(w, w, np.ones(3), 0.5, 0.1, rng)
    with pytest.raises(ValueError, match="prune_ratio=1.0"):
        prune_and_regrow(w, w, np.ones(4), 0.5, 1.0, rng)
    with pytest.raises(ValueError, match="target_density=-0.1"):
        prune_and_regrow(w, w, np.ones(4), -0.1, 0.1, rng)


@st.composite
def layer_states(draw):
    w = draw(arrays(min_side=2))
    g = draw(hnp.arrays(np.float32, w.shape, elements=finite))
    mask = draw(hnp.arrays(np.float32, w.shape, elements=st.sampled_from([0.0, 1.0])))
    return w * mask, g * mask, mask  # as an engine holds them: masked weights and gradients are 0


@given(layer_states(), densities, st.floats(0.0, 0.99), st.integers(0, 2**32 - 1))
def test_prune_and_regrow_properties(state, density, prune_ratio, seed):
    w, g, mask = state
    new = prune_and_regrow(w, g, mask, density, prune_ratio, np.random.default_rng(seed))
    again = prune_and_regrow(w, g, mask, density, prune_ratio, np.random.default_rng(seed))
    np.testing.assert_array_equal(new, again)  # determinism per seed
    target = keep_count(w.size, density)
    assert new.dtype == np.float32 and new.shape == w.shape and int(new.sum()) == target
    active = mask == 1
    survivors = active & (new == 1)
    pruned = active & (new == 0)
    fresh_zeros = int((~active).sum())
    n_keep = min(int(active.sum()), int(np.floor(target * (1 - prune_ratio) + 1e-9)))
    if target - n_keep <= fresh_zeros:
        # enough old zeros: no weight pruned in this update is revived, so the survivors
        # are exactly the n_keep most important of the previously active weights
        assert int(survivors.sum()) == n_keep
        imp = importance(w, g)
        if survivors.any() and pruned.any():
            assert imp[survivors].min() >= imp[pruned].max()


def test_prune_and_regrow_seeds_differ():
    w = np.linspace(1, 2, 100).astype(np.float32)
    mask = (np.arange(100) < 20).astype(np.float32)
    a = prune_and_regrow(w * mask, np.zeros(100, np.float32), mask, 0.2, 0.25, np.random.default_rng(0))
    b = prune_and_regrow(w * mask, np.zeros(100, np.float32), mask, 0.2, 0.25, np.random.default_rng(1))
    assert int(a.sum()) == int(b.sum()) == 20 and not np.array_equal(a, b)
    np.testing.assert_array_equal(a[:20][5:], 1)  # the 15 largest of the old 20 stay (ties: none)


# --- schedules ------------------------------------------------------------------

def test_tdm_schedule_matches_released_code_at_50_epochs():
    assert tdm_schedule(50) == (0, 5, 10, 15, 20, 25, 30, 35, 40)


def test_tdm_schedule_scales_with_epochs():
    assert tdm_schedule(10) == tuple(range(9))
    assert tdm_schedule(20) == (0, 2, 4, 6, 8, 10, 12, 14, 16)
    assert tdm_schedule(1) == (0,)  # the restart at the task's start always happens
    assert tdm_schedule(20, TDMSchedule(update_every=0.25, freeze_after=0.5)) == (0, 5)
    with pytest.raises(ValueError, match="epochs_per_task=0"):
        tdm_schedule(0)
    with pytest.raises(ValueError, match="freeze_after=1.5"):
        TDMSchedule(freeze_after=1.5)
    assert TDMSchedule.from_dict(TDMSchedule(prune_ratio=0.1).to_dict()) == TDMSchedule(prune_ratio=0.1)


@given(st.integers(1, 500))
def test_tdm_schedule_freezes_before_the_end(epochs):
    sched = tdm_schedule(epochs)
    assert sched[0] == 0 and all(0 <= e < epochs for e in sched)
    assert sched[-1] < max(1, int(np.floor(0.9 * epochs + 1e-9)))


def test_ddr_schedule_matches_released_code_at_50_epochs():
    plan = ddr_schedule(50)
    assert list(plan) == [5, 10, 15, 20]
    assert all(f == pytest.approx(0.075) for f in plan.values())
    assert ddr_schedule(1) == {}
    assert DDRSchedule.from_dict(DDRSchedule().to_dict()) == DDRSchedule()


def test_ddr_schedule_waits_for_two_epochs_of_statistics():
    # one epoch since the last reset holds no forgetting event (it needs two presentations)
    assert ddr_schedule(2) == {}
    assert ddr_schedule(3) == {2: pytest.approx(0.3)}
    assert ddr_schedule(10) == {2: pytest.approx(0.15), 4: pytest.approx(0.15)}
    assert list(ddr_schedule(10, DDRSchedule(min_window=1))) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="min_window=0"):
        DDRSchedule(min_window=0)


@given(st.integers(1, 500), st.floats(0.01, 1.0), st.floats(0.01, 1.0), st.floats(0.01, 1.0))
def test_ddr_schedule_total_never_above_cap(epochs, every, stop, cap):
    plan = ddr_schedule(epochs, DDRSchedule(every=every, stop_after=stop, max_fraction=cap))
    assert sum(plan.values()) <= cap + 1e-12
    assert all(1 <= e < epochs for e in plan)
    assert all(b - a >= 2 for a, b in zip([0, *plan], plan))  # every removal sees >= 2 epochs


# --- forgetting and removal -----------------------------------------------------

def test_forgetting_tracker_counts_correct_to_incorrect():
    t = ForgettingTracker(4)
    for correct in ([1, 0, 1, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 1, 0]):
        t.update(np.arange(4), np.array(correct, bool))
    np.testing.assert_array_equal(t.events, [2, 0, 1, 0])
    np.testing.assert_array_equal(t.ever_learned, [True, False, True, False])
    np.testing.assert_array_equal(t.presentations, [4, 4, 4, 4])
    t.update(np.array([3]), np.array([True]))  # a partial batch touches only its examples
    np.testing.assert_array_equal(t.ever_learned, [True, False, True, True])
    t.reset()
    assert t.events.sum() == 0 and not t.ever_learned.any()


def test_forgetting_tracker_errors_leave_state():
    t = ForgettingTracker(3)
    with pytest.raises(ValueError, match="index 3 is out of range"):
        t.update(np.array([0, 3]), np.array([True, True]))
    with pytest.raises(ValueError, match="repeat"):
        t.update(np.array([1, 1]), np.array([True, False]))
    assert not t.ever_learned.any() and t.presentations.sum() == 0


def test_select_removal_literal():
    counts = np.array([3, 0, 1, 0, 0, 2])
    learned = np.array([True, True, True, False, True, True])
    # learned by count (1, 4: 0; 2: 1; 5: 2; 0: 3), then the never-learned 3
    np.testing.assert_array_equal(select_removal(counts, learned, 0.5), [1, 4, 2])
    np.testing.assert_array_equal(select_removal(counts, learned, 1.0), [1, 4, 2, 5, 0, 3])
    available = np.array([True, False, True, True, True, True])
    np.testing.assert_array_equal(select_removal(counts, learned, 0.5, available), [4, 2, 5])
    assert select_removal(counts, learned, 0.1).size == 0  # floor(0.6) = 0
    with pytest.raises(ValueError, match="fraction=1.5"):
        select_removal(counts, learned, 1.5)


@given(st.integers(1, 60).flatmap(lambda n: st.tuples(
    hnp.arrays(np.int64, n, elements=st.integers(0, 5)), hnp.arrays(np.bool_, n), hnp.arrays(np.bool_, n))),
    densities)
def test_select_removal_properties(arrays_, fraction):
    counts, learned, available = arrays_
    out = select_removal(counts, learned, fraction, available)
    assert out.size <= int(np.floor(fraction * counts.size + 1e-9))  # never above the cap
    assert out.size == min(int(np.floor(fraction * counts.size + 1e-9)), int(available.sum()))
    assert available[out].all() and np.unique(out).size == out.size
    rest = np.setdiff1d(np.flatnonzero(available), out)
    if out.size and rest.size:  # everything removed is forgotten no more than everything kept
        key = lambda i: (not learned[i], counts[i])  # noqa: E731
        assert max(key(i) for i in out) <= min(key(i) for i in rest)


# --- DGM ------------------------------------------------------------------------

def test_dgm_recomputes_every_n_steps_and_reuses_between():
    dgm = DGM(density=0.5, every=3, names={"w"})
    g0 = {"w": np.array([4.0, 3.0, 0.25, 0.5], np.float32), "b": np.array([1.0, 2.0], np.float32)}
    g1 = {"w": np.array([0.25, 0.5, 4.0, 3.0], np.float32), "b": np.array([1.0, 2.0], np.float32)}
    out = dgm.apply(0, g0)
    np.testing.assert_array_equal(out["w"], [4.0, 3.0, 0.0, 0.0])
    np.testing.assert_array_equal(out["b"], g0["b"])  # not a masked name: passes through
    np.testing.assert_array_equal(dgm.apply(1, g1)["w"], [0.25, 0.5, 0.0, 0.0])  # step 1: old mask reused
    np.testing.assert_array_equal(dgm.apply(2, g1)["w"], [0.25, 0.5, 0.0, 0.0])
    np.testing.assert_array_equal(dgm.apply(3, g1)["w"], [0.0, 0.0, 4.0, 3.0])  # step 3: recomputed
    assert dgm.apply(4, g1)["w"].dtype == np.float32


def test_dgm_first_call_off_schedule_and_errors():
    dgm = DGM(density=0.25, every=30)
    out = dgm.apply(7, {"w": np.array([1.0, 5.0, 2.0, 3.0], np.float32)})  # no mask stored yet: computed
    np.testing.assert_array_equal(out["w"], [0.0, 5.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="stored mask"):
        dgm.apply(8, {"w": np.ones(3, np.float32)})
    dgm.reset()
    assert dgm.apply(8, {"w": np.ones(3, np.float32)})["w"].sum() == 1.0
    with pytest.raises(ValueError, match="every=0"):
        DGM(every=0)
    with pytest.raises(ValueError, match="density=0"):
        DGM(density=0)


@settings(max_examples=50)
@given(arrays(), st.floats(0.01, 1.0), st.integers(1, 10), st.integers(0, 100))
def test_dgm_keeps_exact_density_at_recompute(g, density, every, step):
    dgm = DGM(density=density, every=every)
    out = dgm.apply(step, {"g": g})["g"]
    assert int(dgm.masks["g"].sum()) == keep_count(g.size, density)
    assert np.count_nonzero(out) <= keep_count(g.size, density)


@given(hnp.arrays(np.float32, st.integers(1, 300), elements=st.sampled_from([0.0, 0.5, 1.0, -2.0, 3.25])),
       st.integers(0, 310))
def test_fast_top_indices_is_the_stable_sort_set(scores, k):
    """The partition-based top-k keeps exactly what the stable sort keeps, ties by lower index."""
    from edgecl.runtime.sparcl import _ranked, _top_indices

    expected = np.sort(_ranked(scores)[:k])
    np.testing.assert_array_equal(_top_indices(scores, k), expected)


def test_a_sparcl_step_before_the_first_masks_warns_that_it_trains_dense(exported):
    from edgecl.runtime import OptimizerConfig, ReplayBuffer, open_engine
    from edgecl.runtime.strategies import Learner, SparCLConfig, StrategyConfig

    _, folder = exported("cnn")
    engine = open_engine(folder, OptimizerConfig("sgd", lr=0.01), threads=1)
    buffer = ReplayBuffer(50, (1, 8, 8), 10, np.random.default_rng(1))
    learner = Learner(engine, StrategyConfig("derpp", sparcl=SparCLConfig(0.75)), buffer, np.random.default_rng(0))
    x, y = np.zeros((4, 1, 8, 8), np.float32), np.arange(4)
    with pytest.raises(ValueError, match="observe before begin_task"):
        learner.observe(x, y, np.arange(4))
    learner.begin_task(0, 4)
    with pytest.warns(RuntimeWarning, match="before SparCL's first masks, so it trains dense"):
        learner.observe(x, y, np.arange(4))
