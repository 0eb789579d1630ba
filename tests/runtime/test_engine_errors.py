"""Bad input raises a clear error naming the value, and leaves the engine untouched."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from edgecl.runtime import ArtifactError, BatchError, OptimizerConfig, open_engine
from tests.helpers import batch
from tests.runtime.engine_state import KINDS, assert_unchanged, open_test_engine, snapshot


@pytest.fixture(params=["portable", pytest.param("ort-training", marks=pytest.mark.ort_training)])
def engine(request, exported):
    _, folder = exported("cnn", request.param)
    return open_engine(folder)


def _bad_batches(rng):
    x, y = batch(rng, 8)
    nan = x.copy()
    nan[3, 0, 2, 2] = np.nan
    inf = x.copy()
    inf[0, 0, 0, 0] = np.inf
    return [
        ((x[:, :, :4], y), r"x\.shape is \(8, 1, 4, 8\); accepted: \(8, 1, 8, 8\)"),
        ((x[0], y), r"x has shape \(1, 8, 8\); accepted: \(N, 1, 8, 8\)"),
        ((x.astype(np.float64), y), r"x\.dtype is float64; accepted: float32"),
        ((x.tolist(), y), r"x has shape list"),
        ((nan, y), r"x holds a non-finite value nan at index \(3, 0, 2, 2\)"),
        ((inf, y), r"x holds a non-finite value inf"),
        ((x, y.astype(np.float32)), r"y has dtype float32; accepted: an integer"),
        ((x, y[:5]), r"y\.shape is \(5,\); accepted: \(8,\)"),
        ((x, np.where(np.arange(8) == 2, 10, y)), r"y\[2\] = 10 is out of range; accepted: labels in \[0, 9\]"),
        ((x, np.where(np.arange(8) == 0, -1, y)), r"y\[0\] = -1 is out of range"),
        ((x, y, np.ones(3, np.float32)), r"sample_weight\.shape is \(3,\); accepted: \(8,\)"),
        ((x, y, None, np.full((8, 10), np.nan, np.float32)), r"target_logits holds a non-finite value"),
    ]


def test_bad_batches_raise_and_leave_state_untouched(engine, rng):
    before = (engine.parameters(), engine.buffers(), engine.steps_done)
    for args, message in _bad_batches(rng):
        for call in (engine.step, engine.loss_and_grads):
            with pytest.raises(BatchError, match=message):
                call(*args)
    after = (engine.parameters(), engine.buffers(), engine.steps_done)
    assert after[2] == before[2]
    for k, v in before[0].items():
        assert np.array_equal(v, after[0][k])


def test_bad_evaluate_input(engine):
    with pytest.raises(BatchError, match="float32"):
        engine.evaluate(np.zeros((2, 1, 8, 8), np.int32))
    with pytest.raises(BatchError, match=r"accepted: \(N, 1, 8, 8\)"):
        engine.evaluate(np.zeros((2, 8, 8), np.float32))


def test_bad_masks_and_gradients(engine, rng):
    name = next(iter(engine.masks()))
    shape = engine.masks()[name].shape
    with pytest.raises(ValueError, match=r"mask .* holds 0\.5 at index \(0, 0, 0, 0\), a value other than 0 and 1"):
        engine.set_masks({name: np.full(shape, 0.5, np.float32)})
    with pytest.raises(ValueError, match=f"has shape \\(3,\\); accepted: \\{shape}".replace("(", "\\(").replace(")", "\\)").replace("\\\\", "\\")):
        engine.set_masks({name: np.ones(3, np.float32)})
    with pytest.raises(KeyError, match="nope"):
        engine.set_masks({"nope": np.ones(3, np.float32)})
    _, grads = engine.loss_and_grads(*batch(rng))
    grads.pop(next(iter(grads)))
    with pytest.raises(KeyError, match="gradients missing"):
        engine.apply_gradients(grads)


def test_altered_missing_and_malformed_artifacts_are_refused(exported, tmp_path):
    import shutil

    _, folder = exported("mlp")
    copy = tmp_path / "art"
    shutil.copytree(folder, copy)
    data = bytearray((copy / "step.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "step.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"step\.onnx.*sha256.*altered or truncated"):
        open_engine(copy)
    (copy / "step.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"step\.onnx.*is missing"):
        open_engine(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"manifest\.json.*edited or damaged"):  # its digest is checked first
        open_engine(copy)
    (copy / "manifest.json").write_text(json.dumps({"engine": "tflite"}))
    with pytest.raises(ArtifactError):
        open_engine(copy)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        open_engine(tmp_path / "nowhere")


def test_truncated_or_foreign_state_file_is_refused(exported, tmp_path, rng):
    _, folder = exported("mlp")
    eng = open_engine(folder)
    path = eng.save(tmp_path / "s.npz")
    path.write_bytes(path.read_bytes()[:100])
    before = eng.parameters()
    with pytest.raises(ArtifactError, match="unreadable"):
        eng.load(path)
    _, other = exported("cnn")
    open_engine(other).save(tmp_path / "other.npz")
    with pytest.raises(ArtifactError, match="another model"):
        eng.load(tmp_path / "other.npz")
    for k, v in eng.parameters().items():
        assert np.array_equal(v, before[k])


SGD_MOMENTUM = OptimizerConfig("sgd", lr=0.03, momentum=0.9)


@pytest.fixture(params=KINDS)
def bn_engine(request, exported, rng):
    """A model with BatchNorm after one step: momentum buffers and running statistics are not at init."""
    engine = open_test_engine(exported, request.param, "resnet", SGD_MOMENTUM)
    engine.step(*batch(rng, 8))
    return engine


def test_rejected_step_leaves_batchnorm_statistics_unchanged(bn_engine, rng):
    """Issue 11 item 6: x = 1e19 overflows the batch variance; nothing may be committed."""
    before = snapshot(bn_engine)
    x, y = batch(rng, 8)
    for call in (bn_engine.step, bn_engine.loss_and_grads):
        with pytest.raises(BatchError, match=r"the batch gives a non-finite .* with \|x\| up to 1e\+19; the call "
                                             r"was refused and the engine is unchanged"):
            call(np.full((8, 1, 8, 8), 1e19, np.float32), y)
        assert_unchanged(before, bn_engine)
    assert np.isfinite(bn_engine.evaluate(x)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_float64_beyond_float32_is_refused_not_turned_into_inf(exported, kind):
    """Issue 11 item 7: the finite check ran before the cast to float32."""
    engine = open_test_engine(exported, kind, "cnn")
    before = snapshot(engine)
    name = "3.weight"  # masked (a mask of ones)
    shape = engine.param_shapes[name]
    with pytest.raises(ValueError, match=r"parameter '3\.weight' holds 1e\+39 at index \(0, 0, 0, 0\), beyond "
                                         r"float32's range"):
        engine.set_parameters({name: np.full(shape, 1e39)})
    with pytest.raises(ValueError, match=r"mask '3\.weight' holds -1e\+300 at index \(0, 0, 0, 0\), beyond"):
        engine.set_masks({name: np.full(shape, -1e300)})
    grads = {n: np.zeros(s) for n, s in engine.trainable_shapes.items()}
    grads[name] = np.where(np.arange(np.prod(shape)).reshape(shape) == 5, 1e39, 0.0)
    with pytest.raises(ValueError, match=r"gradient '3\.weight' holds 1e\+39 at index \(0, 0, 1, 2\), beyond"):
        engine.apply_gradients(grads)
    assert_unchanged(before, engine)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.complex64, object])
def test_arrays_of_other_dtypes_are_refused(exported, kind, dtype):
    engine = open_test_engine(exported, kind, "mlp")
    before = snapshot(engine)
    name, shape = next(iter(engine.trainable_shapes.items()))
    bad = np.zeros(shape, dtype)
    message = rf"{{}} '{re.escape(name)}' has dtype {np.dtype(dtype)}; accepted: a float32 array"
    with pytest.raises(ValueError, match=message.format("parameter")):
        engine.set_parameters({name: bad})
    with pytest.raises(ValueError, match=message.format("gradient")):
        engine.apply_gradients({**{n: np.zeros(s, np.float32) for n, s in engine.trainable_shapes.items()}, name: bad})
    assert_unchanged(before, engine)


@pytest.mark.parametrize("kind", KINDS)
def test_update_that_would_overflow_float32_is_refused(exported, kind):
    """A step whose update leaves float32's range is refused with the state unchanged, not turned into inf."""
    engine = open_test_engine(exported, kind, "cnn", SGD_MOMENTUM)
    engine.set_learning_rate(1e30)
    before = snapshot(engine)
    grads = {n: np.full(s, 1e10, np.float32) for n, s in engine.trainable_shapes.items()}
    with pytest.raises(ValueError, match=r"the sgd update of '0\.weight' at lr=1e\+30 could leave float32's range"):
        engine.apply_gradients(grads)
    assert_unchanged(before, engine)


def _drop_optimizer(state):
    return {k: v for k, v in state.items() if not k.startswith("optim")}


def _nan_weight(state):
    w = state["param::conv1.weight"].copy()
    w[0, 0, 1, 1] = np.nan
    return {**state, "param::conv1.weight": w}


def _half_mask(state):
    m = state["mask::conv1.weight"].copy()
    m[0, 0, 0, 0] = 0.5
    return {**state, "mask::conv1.weight": m}


def _weight_under_zero_mask(state):
    m = state["mask::conv1.weight"].copy()
    m[0, 0, 0, 1] = 0.0  # the weight there is not 0
    return {**state, "mask::conv1.weight": m}


def _short_weight(state):
    return {**state, "param::conv1.weight": state["param::conv1.weight"][:, :, :2]}


@pytest.mark.parametrize("alter, message", [
    (_drop_optimizer, r"lacks \[.*'optim"),
    (_nan_weight, r"param::conv1\.weight holds nan at index \(0, 0, 1, 1\); accepted: finite values only"),
    (_half_mask, r"mask::conv1\.weight holds 0\.5 at index \(0, 0, 0, 0\); accepted: 0 and 1 only"),
    (_weight_under_zero_mask,
     r"param::conv1\.weight holds .* at index \(0, 0, 0, 1\); accepted: 0 wherever the mask is 0"),
    (_short_weight, r"param::conv1\.weight has shape \(16, 1, 2, 3\); accepted: \(16, 1, 3, 3\)"),
], ids=["no-optimizer-arrays", "nan-weight", "mask-0.5", "weight-under-mask-0", "wrong-shape"])
@pytest.mark.parametrize("kind", KINDS)
def test_altered_state_is_refused_before_anything_is_loaded(exported, rng, tmp_path, kind, alter, message):
    """Issue 11 item 7: Engine.load checks the whole state first, then swaps it in."""
    saved = open_test_engine(exported, kind, "resnet", SGD_MOMENTUM)
    saved.step(*batch(rng, 8))
    state = alter(saved.state_arrays())
    engine = open_test_engine(exported, kind, "resnet", SGD_MOMENTUM)
    engine.step(*batch(rng, 8))
    before = snapshot(engine)
    with pytest.raises(ArtifactError, match=message):
        engine.load_state_arrays(state, "s")
    np.savez(tmp_path / "s.npz", **state)
    with pytest.raises(ArtifactError, match=message):
        engine.load(tmp_path / "s.npz")
    assert_unchanged(before, engine)
