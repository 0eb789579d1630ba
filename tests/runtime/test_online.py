"""The online learner an app embeds: learn / predict / save / reopen, task-free SparCL, bad input."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edgecl.runtime import BatchError, ConfigMismatchError, FolderBusyError
from edgecl.runtime.buffer_log import log_name
from edgecl.runtime.online import open_learner

SHAPE = (1, 8, 8)


def stream(n: int, seed: int = 0, classes=range(10)):
    """n samples: a fixed random template per class plus noise, labels drawn from `classes`."""
    templates = np.random.default_rng(1234).standard_normal((10, *SHAPE))
    rng = np.random.default_rng(seed)
    y = rng.choice(np.asarray(list(classes)), n)
    x = (templates[y] + 0.5 * rng.standard_normal((n, *SHAPE))).astype(np.float32)
    return x, y.astype(np.int64)


def groups(n: int, seed: int = 0, low: int = 1, high: int = 8):
    rng = np.random.default_rng(seed + 100)
    cuts, i = [], 0
    while i < n:
        g = int(rng.integers(low, high + 1))
        cuts.append((i, min(n, i + g)))
        i += g
    return cuts


def state_of(learner) -> dict:
    """Everything that decides what a learner does next, as arrays."""
    out = {f"engine::{k}": v for k, v in learner.learner.engine.state_arrays().items()}
    out.update({f"learner::{k}": v for k, v in learner.learner.state_arrays().items()})
    b = learner.buffer
    if b is not None:
        n = len(b)
        out.update({"buffer::x": b.x[:n], "buffer::y": b.y[:n], "buffer::task": b.task[:n],
                    "buffer::logits": b.logits[:n], "buffer::seen": np.array(b.seen)})
        out["buffer::rng_state"] = np.frombuffer(repr(b.rng.bit_generator.state).encode(), np.uint8)
    out["samples_seen"] = np.array(learner.samples_seen)
    return out


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@pytest.fixture
def cnn(exported):
    return exported("cnn")[1]


def test_learn_predict_and_samples_seen(cnn, tmp_path):
    x, y = stream(300)
    with open_learner(cnn, tmp_path / "s", method="er", sparsity=None, budget="2MiB", lr=0.1, threads=1) as learner:
        before = (learner.predict(x[:100]) == y[:100]).mean()
        for lo, hi in groups(300):
            loss = learner.learn(x[lo:hi], y[lo:hi])
            assert np.isfinite(loss)
        assert learner.samples_seen == 300
        assert learner.learner.step == len(groups(300))  # one step per call of <= batch_size samples
        after = (learner.predict(x[:100]) == y[:100]).mean()
        assert after > before + 0.3
        p = learner.predict_proba(x[:5])
        assert p.dtype == np.float32 and p.shape == (5, 10)
        np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-5)
        assert (p.argmax(1) == learner.predict(x[:5])).all()


def test_a_large_call_is_cut_into_batches_and_replay_steps_follow(cnn, tmp_path):
    x, y = stream(70)
    with open_learner(cnn, tmp_path / "s", method="derpp", sparsity=None, budget="2MiB", batch_size=32,
                      replay_steps=2, threads=1) as learner:
        learner.learn(x, y)
        assert learner.learner.step == 3 * (1 + 2)  # 32 + 32 + 6 samples, each step followed by 2 replay steps
        assert learner.samples_seen == 70 and learner.buffer.seen == 70  # replay steps add nothing


def test_task_free_sparcl_masks_at_the_first_step_and_tdm_on_steps(cnn, tmp_path):
    x, y = stream(200)
    with open_learner(cnn, tmp_path / "s", method="derpp", sparsity=0.75, tdm_every=10, budget="2MiB",
                      threads=1) as learner:
        names = learner.learner.sparse_names
        assert names
        assert all(m.mean() == 1.0 for m in learner.learner.engine.masks().values())  # exported dense
        learner.learn(x[:4], y[:4])
        masks = learner.learner.engine.masks()
        for n in names:
            assert masks[n].mean() == pytest.approx(0.25, abs=0.02), n
        for i in range(4, 44, 4):  # 10 more steps: one TDM update at step 10
            learner.learn(x[i : i + 4], y[i : i + 4])
        later = learner.learner.engine.masks()
        assert any(not np.array_equal(masks[n], later[n]) for n in names)
        for n in names:
            assert later[n].mean() == pytest.approx(0.25, abs=0.02), n
        assert learner.learner.dgm is not None and learner.learner.dgm.masks  # DGM on its step schedule


def test_end_task_moves_to_the_next_task_id_once(cnn, tmp_path):
    x, y = stream(20)
    with open_learner(cnn, tmp_path / "s", method="er", sparsity=None, budget="2MiB", threads=1) as learner:
        learner.end_task()  # nothing learned yet: no new task
        assert learner.task == 0
        learner.learn(x[:10], y[:10])
        learner.end_task()
        learner.begin_task()  # no samples since the boundary: nothing
        assert learner.task == 1
        learner.learn(x[10:], y[10:])
        assert sorted(set(learner.buffer.task[:20].tolist())) == [0, 1]


# --- persistence ----------------------------------------------------------------------------
def run_stream(artifacts, state_dir, n=240, save_every=3, stop_at=None, **settings):
    """Learn the test stream from where the state folder stands, saving every `save_every` calls."""
    x, y = stream(n)
    with open_learner(artifacts, state_dir, threads=1, **settings) as learner:
        calls = [c for c in groups(n) if c[0] >= learner.samples_seen]
        for i, (lo, hi) in enumerate(calls):
            if stop_at is not None and lo >= stop_at:
                break
            learner.learn(x[lo:hi], y[lo:hi])
            if (i + 1) % save_every == 0:
                learner.save()
        learner.save()
        return state_of(learner)


SETTINGS = {"method": "derpp", "sparsity": 0.75, "tdm_every": 7, "budget": "2MiB", "buffer": 60, "replay_steps": 1}


def test_save_and_reopen_continue_exactly(cnn, tmp_path):
    whole = run_stream(cnn, tmp_path / "a", **SETTINGS)
    run_stream(cnn, tmp_path / "b", stop_at=100, **SETTINGS)
    assert_same_state(run_stream(cnn, tmp_path / "b", **SETTINGS), whole)


def test_a_save_appends_only_the_changed_slots(cnn, tmp_path):
    x, y = stream(400)
    with open_learner(cnn, tmp_path / "s", method="er", sparsity=None, buffer=100, budget=None, threads=1) as learner:
        learner.learn(x[:50], y[:50])
        learner.save()
        record = learner._log.dtype.itemsize
        log = tmp_path / "s" / log_name(0)
        assert log.stat().st_size == 50 * record
        learner.learn(x[50:58], y[50:58])
        learner.save()
        assert log.stat().st_size == 58 * record  # 8 new slots, not the whole buffer
        for i in range(58, 400, 8):  # the buffer fills, then replaces: the log compacts past 2x
            learner.learn(x[i : i + 8], y[i : i + 8])
            learner.save()
        files = sorted(p.name for p in (tmp_path / "s").glob("buffer-*.log"))
        assert len(files) <= 2 and files[-1] != log_name(0)
        newest = tmp_path / "s" / files[-1]
        assert newest.stat().st_size <= 2 * 100 * record
        saved = state_of(learner)
    with open_learner(cnn, tmp_path / "s", method="er", sparsity=None, buffer=100, budget=None, threads=1) as again:
        assert_same_state(state_of(again), saved)


def test_a_torn_buffer_log_falls_back_to_the_older_save(cnn, tmp_path):
    x, y = stream(40)
    with open_learner(cnn, tmp_path / "s", method="er", sparsity=None, buffer=100, budget=None, threads=1) as learner:
        learner.learn(x[:20], y[:20])
        learner.save()
        older = state_of(learner)
        learner.learn(x[20:], y[20:])
        learner.save()
    log = tmp_path / "s" / log_name(0)
    data = bytearray(log.read_bytes())
    data[-10] ^= 0xFF  # a record of the newest save only
    log.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="CRC-32.*falling back"):
        again = open_learner(cnn, tmp_path / "s", method="er", sparsity=None, buffer=100, budget=None, threads=1)
    with again:
        assert_same_state(state_of(again), older)
        assert log.stat().st_size == 20 * again._log.dtype.itemsize  # the torn tail is cut


def test_a_state_of_other_settings_or_artifacts_is_refused(cnn, exported, tmp_path):
    run_stream(cnn, tmp_path / "s", n=30, method="derpp", sparsity=None, budget="2MiB")
    with pytest.raises(ConfigMismatchError, match=r"sparsity: None in the checkpoint, 0.75 now"):
        open_learner(cnn, tmp_path / "s", method="derpp", sparsity=0.75, budget="2MiB")
    with pytest.raises(ConfigMismatchError, match=r"method: 'derpp' in the checkpoint, 'er' now"):
        open_learner(cnn, tmp_path / "s", method="er", sparsity=None, budget="2MiB")
    _, mlp = exported("mlp")
    with pytest.raises(ConfigMismatchError, match="artifact_manifest_sha256"):
        open_learner(mlp, tmp_path / "s", method="derpp", sparsity=None, budget="2MiB")
    # threads do not change what is learned: free
    with open_learner(cnn, tmp_path / "s", method="derpp", sparsity=None, budget="2MiB", threads=2) as learner:
        assert learner.samples_seen == 30


def test_one_process_holds_a_state_folder(cnn, tmp_path):
    with open_learner(cnn, tmp_path / "s", method="er", sparsity=None, budget="2MiB"):
        with pytest.raises(FolderBusyError):
            open_learner(cnn, tmp_path / "s", method="er", sparsity=None, budget="2MiB")


# --- threads ---------------------------------------------------------------------------------
def test_predict_from_another_thread_sees_only_whole_steps(cnn, tmp_path):
    """Every prediction taken while `learn` runs in another thread equals the model after some
    whole number of steps, as a sequential run of the same stream shows them."""
    x, y = stream(160)
    probe = x[:16]
    settings = dict(method="derpp", sparsity=0.75, tdm_every=5, budget="2MiB", threads=1)
    snapshots = []
    with open_learner(cnn, tmp_path / "seq", **settings) as learner:
        snapshots.append(learner.predict_proba(probe))
        for lo, hi in groups(160):
            learner.learn(x[lo:hi], y[lo:hi])
            snapshots.append(learner.predict_proba(probe))
    seen = []
    with open_learner(cnn, tmp_path / "par", **settings) as learner:
        def train():
            for lo, hi in groups(160):
                learner.learn(x[lo:hi], y[lo:hi])

        worker = threading.Thread(target=train)
        worker.start()
        while worker.is_alive():
            seen.append(learner.predict_proba(probe))
        worker.join()
        seen.append(learner.predict_proba(probe))
    stacked = np.stack(snapshots)
    for p in seen:
        assert np.abs(stacked - p).max(axis=(1, 2)).min() == 0.0
    assert np.array_equal(seen[-1], snapshots[-1])


# --- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("x, y, message", [
    (np.zeros((2, 1, 8, 7), np.float32), np.zeros(2, np.int64), r"x has shape \(2, 1, 8, 7\); accepted: \(N, 1, 8, 8\)"),
    (np.zeros((1, 8, 8), np.float32), np.zeros(1, np.int64), r"one sample: x\[None\]"),
    (np.zeros((0, 1, 8, 8), np.float32), np.zeros(0, np.int64), "0 samples"),
    (np.zeros((2, 1, 8, 8)), np.zeros(2, np.int64), r"float64; accepted: float32 \(convert"),
    (np.full((2, 1, 8, 8), np.nan, np.float32), np.zeros(2, np.int64), r"x\[0, 0, 0, 0\] is nan"),
    (np.zeros((2, 1, 8, 8), np.float32), np.zeros(3, np.int64), r"y is int64 \(3,\); accepted: .*\(2,\)"),
    (np.zeros((2, 1, 8, 8), np.float32), [0, 1], "y is list"),
    (np.zeros((2, 1, 8, 8), np.float32), np.array([0.0, 1.0]), "y is float64"),
    (np.zeros((2, 1, 8, 8), np.float32), np.array([0, -1]), r"y\[1\] = -1; accepted: labels in \[0, 9\]"),
    (np.zeros((2, 1, 8, 8), np.float32), np.array([3, 10]),
     r"y\[1\] = 10 is past the model's head: it was exported with 10 classes .*larger head .*--classes"),
])
def test_bad_input_is_refused_before_any_change(cnn, tmp_path, x, y, message):
    with open_learner(cnn, tmp_path / "s", method="derpp", sparsity=0.75, budget="2MiB", threads=1) as learner:
        learner.learn(*stream(5))
        before = state_of(learner)
        with pytest.raises(BatchError, match=message):
            learner.learn(x, y)
        assert_same_state(state_of(learner), before)


def test_predict_refuses_bad_input(cnn, tmp_path):
    with open_learner(cnn, tmp_path / "s", method="er", sparsity=None, budget="2MiB") as learner:
        with pytest.raises(BatchError, match="float64; accepted: float32"):
            learner.predict(np.zeros((1, 1, 8, 8)))
        with pytest.raises(BatchError, match="shape"):
            learner.predict_proba(np.zeros((1, 8, 8), np.float32))


@pytest.mark.parametrize("settings, message", [
    ({"method": "joint"}, "joint training needs every task's data at once"),
    ({"method": "finetune", "sparsity": 0.75}, "SparCL runs on er or derpp"),
    ({"method": "finetune", "sparsity": None, "replay_steps": 1}, "keeps no buffer"),
    ({"budget": "8 MeB"}, r"budget='8 MeB': size '8 MeB' is not understood"),
    ({"budget": None}, "give a budget"),
    ({"budget": "20KiB"}, "20KiB|20480"),  # the planner names what the model needs
    ({"buffer": 10**6, "budget": "2MiB"}, "does not fit the budget 2MiB: it leaves room for"),
    ({"tdm_every": 0}, r"tdm_every=0; accepted: an integer >= 1"),
    ({"lr": 0.0}, r"lr=0.0; accepted: > 0"),
    ({"structure": "channel"}, "channel"),  # this export is not channel-structured
])
def test_bad_settings_are_refused_and_leave_no_state(cnn, tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        open_learner(cnn, tmp_path / "s", **settings)
    assert not list((tmp_path / "s").glob("ckpt-*")) if (tmp_path / "s").exists() else True
    with open_learner(cnn, tmp_path / "s", method="er", sparsity=None, budget="2MiB"):
        pass  # the folder's lock was released


@pytest.mark.torch  # an export without masks is not among the torch-free job's fixtures
def test_sparcl_without_masked_weights_is_refused(exported, tmp_path):
    _, dense = exported("mlp", masks=None)
    with pytest.raises(ValueError, match="SparCL needs masked weights"):
        open_learner(dense, tmp_path / "s", method="derpp", sparsity=0.75, budget="2MiB")


def test_the_inference_model_gives_predict_proba_in_a_stock_onnxruntime_process(cnn, tmp_path):
    """Written mid-stream by the online learner; run where neither torch nor onnx can be imported."""
    from tests.runtime.test_inference_model import run_model

    x, y = stream(100)
    with open_learner(cnn, tmp_path / "s", method="derpp", sparsity=0.75, budget="2MiB", threads=1) as learner:
        for lo, hi in groups(100):
            learner.learn(x[lo:hi], y[lo:hi])
        path = learner.export_inference(tmp_path / "model.onnx")
        expected = learner.predict_proba(x[:20])
    logits, probabilities, _ = run_model(path, x[:20])
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert (logits.argmax(1) == expected.argmax(1)).all()
