"""Latent replay: split exports, the frozen prefix, the freeze after a task, the planner, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgecl.exporters.export import export
from edgecl.exporters.latent import split_model, split_points
from edgecl.runtime import open_engine
from edgecl.runtime.buffer import ReplayBuffer, bytes_per_example
from edgecl.runtime.budget import plan_memory
from edgecl.runtime.latent import LatentReplay, PrefixEncoder
from edgecl.runtime.loop import RunConfig, run_scenario
from edgecl.runtime.manifest import load_manifest
from edgecl.runtime.optim import OptimizerConfig
from edgecl.runtime.scenarios import Scenario, digits_scenario
from edgecl.runtime.strategies import Learner, StrategyConfig
from tests.helpers import Killed, dying, make_model, rel_err

CASES = [("cnn", "2"), ("cnn", "5"), ("resnet", "stem"), ("resnet", "layers.1")]


@pytest.fixture(scope="module")
def split_exports(tmp_path_factory):
    cache = {}

    def get(name, point):
        if (name, point) not in cache:
            model = make_model(name)  # BatchNorm statistics perturbed: eval mode shows in the prefix
            folder = tmp_path_factory.mktemp(f"{name}-{point}".replace(".", "_"))
            export(model, torch.randn(4, 1, 8, 8), folder / "art", split=point)
            cache[name, point] = model, folder / "art"
        return cache[name, point]

    return get


@pytest.mark.parametrize("name, point", CASES)
def test_latent_step_equals_the_full_model_with_the_prefix_frozen(split_exports, name, point):
    model, folder = split_exports(name, point)
    manifest = load_manifest(folder)
    engine = open_engine(folder, threads=1)
    encoder = PrefixEncoder(folder, manifest, threads=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 6)
    prefix, suffix = split_model(model, point)
    prefix.eval()
    with torch.no_grad():
        latent = prefix(torch.from_numpy(x))
    assert tuple(manifest.input_shape) == tuple(latent.shape[1:]) == encoder.latent_shape
    assert rel_err(encoder.encode(x), latent.numpy()) < 1e-5
    suffix.train()
    loss = F.cross_entropy(suffix(latent), torch.from_numpy(y))
    grads = torch.autograd.grad(loss, list(suffix.parameters()))
    got_loss, got = engine.loss_and_grads(encoder.encode(x), y)
    assert abs(got_loss - loss.item()) <= 1e-4 * abs(loss.item())
    names = [n for n, _ in suffix.named_parameters()]
    assert sorted(got) == sorted(names) == sorted(p.name for p in manifest.parameters)
    for n, g in zip(names, grads):
        assert rel_err(got[n], g.numpy()) < 1e-4, n
    assert set(manifest.extra["latent"]["prefix_parameters"]).isdisjoint(names)


def test_a_bad_split_point_is_refused_naming_the_accepted_ones_before_any_file(tmp_path):
    model = make_model("cnn")
    assert split_points(model) == ["0", "1", "2", "3", "4", "5", "6", "7", "8"]
    with pytest.raises(ValueError, match=r"split='9' is no split point of this Sequential; accepted: '0', '1'.*'8'"):
        export(model, torch.randn(4, 1, 8, 8), tmp_path / "art", split="9")
    with pytest.raises(ValueError, match=r"split='layer1'.*accepted: 'stem', 'layers.0'"):
        export(make_model("resnet"), torch.randn(4, 1, 8, 8), tmp_path / "art", split="layer1")
    with pytest.raises(ValueError, match="accepted: split with engine='portable'"):
        export(model, torch.randn(4, 1, 8, 8), tmp_path / "art", engine="ort-training", split="2")
    assert not (tmp_path / "art").exists()


def _latent_learner(exported, split_exports, capacity=100, lr=0.05, cls=Learner, die_at_step=None):
    _, full_folder = exported("cnn", masks=None)
    _, folder = split_exports("cnn", "2")
    opt = OptimizerConfig("sgd", lr=lr, momentum=0.9)
    full = open_engine(full_folder, opt, threads=1)
    suffix = open_engine(folder, opt, threads=1)
    buffer = ReplayBuffer(capacity, (1, 8, 8), 10, np.random.default_rng([0, 1]))
    engine = LatentReplay(suffix, PrefixEncoder(folder, suffix.manifest, threads=1), full, freeze_after=0,
                          buffer=buffer)
    learner = cls(engine, StrategyConfig("derpp"), buffer, np.random.default_rng(0))
    learner.die_at_step = die_at_step
    return learner


def test_the_freeze_hands_the_full_weights_over_and_turns_the_buffer_into_latents(exported, split_exports):
    learner = _latent_learner(exported, split_exports)
    engine, buffer = learner.engine, learner.buffer
    rng = np.random.default_rng(1)
    learner.begin_task(0, 8)
    for _ in range(3):
        x = rng.standard_normal((8, 1, 8, 8)).astype(np.float32)
        learner.observe(x, rng.integers(0, 10, 8), np.arange(8))
    raw = buffer.x[: len(buffer)].copy()
    before = engine.full.state_arrays()
    test_x = rng.standard_normal((5, 1, 8, 8)).astype(np.float32)
    full_logits = engine.evaluate(test_x)
    learner.end_task()
    assert engine.frozen and buffer.sample_shape == (16, 4, 4) == engine.prefix.latent_shape
    assert np.array_equal(buffer.x[: len(buffer)], engine.prefix.encode(raw))
    after = engine.suffix.state_arrays()
    for key in after:
        if key != "meta":
            assert np.array_equal(after[key], before[key]), key  # weights and momentum alike
    assert rel_err(engine.evaluate(test_x), full_logits) < 1e-5
    assert learner._flops_per_sample < learner.dense_train_flops  # the suffix's layers only from now on


def test_the_planner_counts_the_latent_bytes(split_exports):
    _, folder = split_exports("cnn", "2")
    manifest = load_manifest(folder)
    raw = plan_memory(manifest, "2MiB", 32, "sgd", 64, sample_shape=(1, 8, 8))
    latent = plan_memory(manifest, "2MiB", 32, "sgd", 64)  # the suffix's input: the latent
    assert latent.replay_example_bytes == bytes_per_example((16, 4, 4), 10) == 4 * 256 + 8 + 40 + 2
    assert raw.replay_example_bytes == 4 * 64 + 8 + 40 + 2
    suffix_bytes = sum(4 * int(np.prod(p.shape)) for p in manifest.parameters)
    assert latent.parameters_bytes == suffix_bytes + 4 * (16 * 9 + 16)  # + the frozen prefix: conv 0
    assert latent.gradients_bytes == suffix_bytes
    assert latent.replay_capacity == (raw.replay_capacity * raw.replay_example_bytes + raw.unused_bytes) \
        // latent.replay_example_bytes < raw.replay_capacity


DyingLearner = dying(Learner)


@pytest.mark.parametrize("die_at", [10, 22])  # before the freeze (task 0 has 18 steps) and after it
def test_a_run_killed_mid_way_resumes_exactly_across_the_freeze(exported, split_exports, tmp_path, die_at):
    full = digits_scenario(seed=0)
    tiny = Scenario("split-digits-2", full.tasks[:2], full.num_classes, full.kind)
    config = RunConfig(epochs=2, batch_size=32, seed=0, checkpoint_every=4)
    plain = run_scenario(tiny, _latent_learner(exported, split_exports), config, progress=False)
    with pytest.raises(Killed):
        run_scenario(tiny, _latent_learner(exported, split_exports, cls=DyingLearner, die_at_step=die_at), config,
                     tmp_path / "ck", progress=False)
    again = run_scenario(tiny, _latent_learner(exported, split_exports), config, tmp_path / "ck", progress=False)
    assert again.resumed
    for key in ("acc_matrix", "task_il_matrix", "acc", "train_flops", "dense_train_flops", "steps"):
        assert getattr(again, key) == getattr(plain, key), key
    assert plain.acc_matrix[1][1] > 0.3  # the suffix alone learned task 1 on the frozen prefix's latents


def test_build_learner_plans_the_buffer_for_latents_and_attaches_it(exported, split_exports):
    from edgecl.runtime.job import LearnerSpec, build_learner

    _, full_folder = exported("cnn", masks=None)
    _, folder = split_exports("cnn", "2")
    full = open_engine(full_folder, threads=1)
    suffix = open_engine(folder, threads=1)
    engine = LatentReplay(suffix, PrefixEncoder(folder, suffix.manifest, threads=1), full)
    scenario = digits_scenario(seed=0)
    spec = LearnerSpec(method="derpp", sparsity=None, buffer=None, budget="2MiB")
    learner, plan, _ = build_learner(engine, scenario, spec)
    _, raw_plan, _ = build_learner(open_engine(full_folder, threads=1), scenario, spec)
    assert plan["replay_example_bytes"] == bytes_per_example((16, 4, 4), 10)
    assert raw_plan["replay_example_bytes"] == bytes_per_example((1, 8, 8), 10)
    assert learner.buffer.capacity == plan["replay_capacity"] < raw_plan["replay_capacity"]
    assert engine.buffer is learner.buffer and learner.buffer.sample_shape == (1, 8, 8)  # raw until the freeze


def test_latent_replay_with_sparcl_or_a_foreign_buffer_is_refused(exported, split_exports):
    from edgecl.runtime.strategies import SparCLConfig

    _, folder = split_exports("cnn", "2")
    suffix = open_engine(folder, threads=1)
    engine = LatentReplay(suffix, PrefixEncoder(folder, suffix.manifest, threads=1))
    with pytest.raises(ValueError, match="buffer sample_shape=\\(1, 8, 8\\); accepted: \\(16, 4, 4\\)"):
        engine.attach(ReplayBuffer(10, (1, 8, 8), 10, np.random.default_rng(0)))
    buffer = ReplayBuffer(10, (16, 4, 4), 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="accepted: latent replay with a dense strategy"):
        Learner(engine, StrategyConfig("derpp", sparcl=SparCLConfig()), buffer, np.random.default_rng(0))
    with pytest.raises(ValueError, match="built with another buffer"):
        Learner(engine, StrategyConfig("derpp"), buffer, np.random.default_rng(0))
