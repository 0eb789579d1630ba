"""Channel-structured SparCL (`SparCLConfig(structure="channel")`): TDM and DGM on whole output
channels of a channel-structured export, FLOPs from the tensors computed, exact resume."""

from __future__ import annotations

import numpy as np
import pytest

from edgecl.runtime import open_engine
from edgecl.runtime.buffer import ReplayBuffer
from edgecl.runtime.channel_sparcl import computed_densities
from edgecl.runtime.flops import training_flops
from edgecl.runtime.loop import RunConfig, run_scenario
from edgecl.runtime.optim import OptimizerConfig
from edgecl.runtime.scenarios import Scenario, digits_scenario
from edgecl.runtime.sparcl import keep_count
from edgecl.runtime.strategies import Learner, SparCLConfig, StrategyConfig
from tests.helpers import IN_SHAPE, Killed, dying, make_model

pytestmark = pytest.mark.torch  # the structured graphs are exported here

SGD_MOMENTUM = OptimizerConfig("sgd", lr=0.05, momentum=0.9)
CHANNEL = StrategyConfig("derpp", sparcl=SparCLConfig(sparsity=0.5, structure="channel"))


@pytest.fixture(scope="module")
def structured(tmp_path_factory):
    """structured(name) -> folder of a channel-structured export of that family (1x8x8), cached."""
    import torch

    from edgecl.exporters import export

    cache = {}

    def get(name):
        if name not in cache:
            folder = tmp_path_factory.mktemp(f"ch-{name}") / "art"
            export(make_model(name), torch.randn(4, *IN_SHAPE), folder, structure="channel")
            cache[name] = folder
        return cache[name]

    return get


def _learner(folder, strategy=CHANNEL, optimizer=SGD_MOMENTUM, seed=0):
    engine = open_engine(folder, optimizer, threads=1)
    buffer = ReplayBuffer(64, IN_SHAPE, 10, np.random.default_rng([seed, 1]), store_logits=True)
    return Learner(engine, strategy, buffer, np.random.default_rng(seed))


def _steps(learner, n, rng, start=0):
    for _ in range(n):
        x = rng.standard_normal((16, *IN_SHAPE)).astype(np.float32)
        y = rng.integers(0, 10, 16).astype(np.int64)
        learner.observe(x, y, np.arange(start, start + 16) % 64)


def _started(folder, rng, steps):
    """A learner past its first channel choice (task 0, epoch 0 of 4) and `steps` steps."""
    learner = _learner(folder)
    learner.begin_task(0, 64)
    learner.begin_epoch(0, 4)
    _steps(learner, steps, rng)
    return learner


def _summed(arrays, names, size):
    total = np.zeros(size)
    for n in names:
        total += np.abs(arrays[n].astype(np.float64)).reshape(size, -1).sum(1)
    return total


@pytest.mark.parametrize("name", ["cnn-s2", "resnet", "mobilenet"])
def test_first_channels_are_the_largest_by_summed_weight_magnitude(structured, name):
    learner = _learner(structured(name))
    cm = learner.channel_masks
    params = learner.engine.parameters()
    learner.begin_task(0, 64)
    learner.begin_epoch(0, 4)
    for s, size in cm.sets.items():
        active = learner.engine.channels()[s]
        assert len(active) == max(1, keep_count(size, 0.5)), s
        scores = _summed(params, cm.producers[s], size)
        assert scores[active].min() >= np.delete(scores, active).max(), s


def test_residual_sets_are_scored_over_every_layer_that_produces_them(structured):
    cm = _learner(structured("resnet")).channel_masks
    assert max(len(ws) for ws in cm.producers.values()) >= 2  # the stem and the blocks' second convs share a set


def test_tdm_keeps_the_most_important_channels_and_regrows_inactive_ones(structured, rng):
    learner = _started(structured("cnn-s2"), rng, 3)
    cm = learner.channel_masks
    before = learner.engine.channels()
    params, grads = learner.engine.parameters(), learner.last_grads
    learner.begin_epoch(1, 4)  # a TDM epoch of a 4-epoch task
    after = learner.engine.channels()
    prune = learner.config.sparcl.tdm_schedule.prune_ratio
    changed = False
    for s, size in cm.sets.items():
        n = len(before[s])
        assert len(after[s]) == n  # the density holds
        score = _summed(params, cm.producers[s], size) + 0.5 * _summed(grads, cm.producers[s], size)
        n_keep = int(np.floor(n * (1 - prune) + 1e-9))
        ranked = before[s][np.argsort(-score[before[s]], kind="stable")]
        kept = set(ranked[:n_keep].tolist())
        assert kept <= set(after[s].tolist()), s
        grown = set(after[s].tolist()) - kept
        assert grown <= set(range(size)) - set(before[s].tolist()), s  # regrown from the inactive ones
        changed |= not np.array_equal(before[s], after[s])
    assert changed  # the channels moved, on the same export


def test_a_regrown_channel_resumes_its_own_weights_and_optimizer_state(structured, rng):
    learner = _started(structured("cnn-s2"), rng, 3)
    engine = learner.engine
    s = next(iter(engine.channel_sets))
    active = engine.channels()[s]
    w = learner.channel_masks.producers[s][0]
    old_weights = engine.parameters()[w][active].copy()
    old_momentum = engine._optimizer.state[w]["momentum"][active].copy()
    inactive = np.setdiff1d(np.arange(engine.channel_sets[s]), active)
    engine.set_channels({s: inactive})  # what a TDM update does: other channels active, these off
    _steps(learner, 2, rng)
    assert np.array_equal(engine.parameters()[w][active], old_weights)
    assert np.array_equal(engine._optimizer.state[w]["momentum"][active], old_momentum)
    engine.set_channels({s: active})  # regrown: they start from where they stopped
    assert np.array_equal(engine.parameters()[w][active], old_weights)


def test_dgm_keeps_whole_output_channels_holding_its_share_of_the_tensor(structured, rng):
    learner = _started(structured("cnn-s2"), rng, 1)
    sets, active = learner.channel_masks.sets, learner.engine.channels()
    density = learner.config.sparcl.grad_density
    for name, mask in learner.dgm.masks.items():
        rows_set, cols_set, _ = learner.channel_masks.gathers[name]
        rows = mask.reshape(mask.shape[0], -1)
        assert np.all((rows == 0).all(1) | (rows == 1).all(1)), name  # whole rows
        kept = np.flatnonzero(rows[:, 0])
        assert set(kept.tolist()) <= set(active[rows_set].tolist())
        col_share = 1.0 if cols_set is None else len(active[cols_set]) / sets[cols_set]
        wanted = int(np.floor(density * mask.size / (rows.shape[1] * col_share) + 0.5))
        assert len(kept) == min(len(active[rows_set]), max(1, wanted)), name


def test_flops_are_counted_from_the_narrowed_tensors(structured):
    learner = _learner(structured("cnn-s2"))
    learner.begin_task(0, 64)
    learner.begin_epoch(0, 4)
    layers, plan = learner.layers, learner.engine.manifest.extra["channels"]
    active = {s: len(v) for s, v in learner.engine.channels().items()}
    by_hand = {}
    for row in layers:
        rows, cols, _ = plan["gathers"].get(row["weight"], [None, None, 1])
        d = (active[rows] / plan["sets"][rows] if rows else 1.0) * (active[cols] / plan["sets"][cols] if cols else 1.0)
        by_hand[row["weight"]] = d
    assert computed_densities(layers, plan["gathers"], plan["sets"], active) == by_hand
    assert by_hand[layers[1]["weight"]] == pytest.approx(0.25)  # conv 2: half its rows, half its columns
    assert learner._flops_per_sample == training_flops(layers, 1, by_hand, by_hand).total  # DGM saves no product
    assert learner._flops_per_sample < 0.4 * learner._dense_flops_per_sample


def test_a_depthwise_layer_counts_whole_it_runs_at_full_width(structured):
    learner = _learner(structured("mobilenet"))
    learner.begin_task(0, 64)
    learner.begin_epoch(0, 4)
    computed = learner.channel_masks.computed_densities()
    depthwise = [r["weight"] for r in learner.layers if r["groups"] > 1 and r["weight_shape"][1] == 1]
    assert depthwise and all(computed[w] == 1.0 for w in depthwise)
    assert min(computed.values()) < 1.0


@pytest.fixture(scope="module")
def tiny():
    full = digits_scenario(seed=0)
    return Scenario("split-digits-2", full.tasks[:2], full.num_classes, full.kind)


DyingLearner = dying(Learner)


def test_a_killed_structured_run_resumes_to_the_uninterrupted_one(structured, tiny, tmp_path):
    config = RunConfig(epochs=3, batch_size=32, seed=0, checkpoint_every=5)
    folder = structured("cnn-s2")
    plain_learner = _learner(folder)
    plain = run_scenario(tiny, plain_learner, config, progress=False)
    dying = _learner(folder)
    dying.__class__ = DyingLearner
    dying.die_at_step = 31  # past a TDM update of task 0 (epoch 1) and inside task 1
    with pytest.raises(Killed):
        run_scenario(tiny, dying, config, tmp_path / "ck", progress=False)
    again_learner = _learner(folder)
    again = run_scenario(tiny, again_learner, config, tmp_path / "ck", progress=False)
    assert again.resumed
    for key in ("acc_matrix", "acc", "train_flops", "dense_train_flops", "steps"):
        assert getattr(again, key) == getattr(plain, key), key
    for s, v in plain_learner.engine.channels().items():
        assert np.array_equal(again_learner.engine.channels()[s], v)
    for n, w in plain_learner.engine.parameters().items():
        assert np.array_equal(again_learner.engine.parameters()[n], w), n


def test_channel_structure_on_an_export_without_channel_sets_is_refused(exported):
    _, folder = exported("cnn")
    engine = open_engine(folder, SGD_MOMENTUM, threads=1)
    with pytest.raises(ValueError, match=r"structure='channel' needs a channel-structured export"):
        Learner(engine, CHANNEL, ReplayBuffer(8, IN_SHAPE, 10, np.random.default_rng(0)), np.random.default_rng(0))


@pytest.mark.parametrize("make, words", [
    (lambda: SparCLConfig(structure="filter"), "structure='filter'; accepted: weight, channel"),
    (lambda: __import__("edgecl.runtime.job", fromlist=["LearnerSpec"]).LearnerSpec(sparsity=None, structure="channel"),
     "structure='channel' with sparsity=None"),
    (lambda: __import__("edgecl.bench.cl_run", fromlist=["JobConfig"]).JobConfig(structure="channel", engine="torch"),
     "structure='channel' with engine='torch'"),
    (lambda: __import__("edgecl.bench.cl_run", fromlist=["JobConfig"]).JobConfig(model="mlp", width=8),
     "width=8 with model='mlp'"),
    (lambda: __import__("edgecl.bench.cl_run", fromlist=["JobConfig"]).JobConfig(width=0), "width=0; accepted"),
])
def test_bad_structure_settings_are_refused_naming_the_value(make, words):
    with pytest.raises(ValueError) as info:
        make()
    assert words in str(info.value)


def test_the_label_names_the_channel_structure():
    assert CHANNEL.label == "SparCL-DER++ 0.50 channel"
