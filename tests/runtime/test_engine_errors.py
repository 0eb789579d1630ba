"""Bad input raises a clear error naming the value, and leaves the engine untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgecl.runtime import ArtifactError, BatchError, open_engine
from tests.helpers import batch


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
    with pytest.raises(ValueError, match="values other than 0 and 1"):
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
