"""`export_inference`: the trained engine as one ONNX inference model any ONNX Runtime runs.

The exported model is run in a child process of the stock-onnxruntime environment (the emulated
board's own python under .ci/arm.sh) in which torch and onnx cannot be imported, as in an app.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgecl.runtime import ArtifactError, OptimizerConfig, UnsupportedModelError, export_inference, open_engine
from edgecl.runtime import inference_model
from edgecl.runtime.latent import LatentReplay, PrefixEncoder
from tests.helpers import IN_SHAPE, TIME_SCALE, make_model

STOCK_PYTHON = Path(__file__).resolve().parents[2] / ".venv-stock-ort" / "bin" / "python"
# where there is no stock environment (the emulated board), this process's python has no torch either
CHILD_PYTHON = str(STOCK_PYTHON) if STOCK_PYTHON.exists() else sys.executable
TOL = 1e-5

BLOCK = 'import sys\nsys.modules["torch"] = None\nsys.modules["onnx"] = None  # an import of either now fails\n'

RUN = BLOCK + textwrap.dedent("""
    import json
    import numpy as np, onnxruntime
    model, data = sys.argv[1], sys.argv[2]
    x = np.load(data)["x"]
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    logits, probabilities = session.run(["logits", "probabilities"], {"x": x})
    np.savez(data, x=x, logits=logits, probabilities=probabilities)
    print(json.dumps({"inputs": [i.name for i in session.get_inputs()], "ort": onnxruntime.__version__,
                      "outputs": [o.name for o in session.get_outputs()],
                      "metadata": session.get_modelmeta().custom_metadata_map}))
""")

TRAIN_AND_WRITE = BLOCK + textwrap.dedent("""
    import json
    import numpy as np
    from edgecl.runtime import OptimizerConfig, export_inference, open_engine
    folder, model = sys.argv[1], sys.argv[2]
    engine = open_engine(folder, OptimizerConfig("sgd", lr=0.1), threads=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 1, 8, 8), dtype=np.float32)
    for _ in range(3):
        engine.step(x, rng.integers(0, 10, 16))
    export_inference(engine, model)
    np.savez(model + ".npz", x=x, logits=engine.evaluate(x))
    print(json.dumps(sorted(m for m in ("torch", "onnx") if sys.modules.get(m) is not None)))
""")


def _child(script: str, *args) -> str:
    out = subprocess.run([CHILD_PYTHON, "-c", script, *map(str, args)], capture_output=True, text=True,
                         timeout=300 * TIME_SCALE)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def run_model(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """(logits, probabilities, session facts) of the model at `path`, run by the child."""
    data = path.with_suffix(".io.npz")
    np.savez(data, x=x)
    facts = json.loads(_child(RUN, path, data))
    with np.load(data) as z:
        return z["logits"], z["probabilities"], facts


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z.astype(np.float64) - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def sparse_masks(engine, rng, density=0.5) -> dict[str, np.ndarray]:
    masks = {n: (rng.random(s) < density).astype(np.float32) for n, s in engine.mask_shapes.items()}
    engine.set_masks(masks)
    return masks


def train(engine, rng, steps=3, shape=IN_SHAPE):
    for _ in range(steps):
        engine.step(rng.standard_normal((16, *shape), dtype=np.float32), rng.integers(0, 10, 16))


def assert_runs_as_engine(engine, path: Path, rng, shape=IN_SHAPE) -> tuple[np.ndarray, np.ndarray, dict]:
    """The exported model's logits and probabilities equal the engine's in a torch- and onnx-free child;
    returns (x, the model's logits, the session facts)."""
    x = rng.standard_normal((9, *shape), dtype=np.float32)
    logits, probabilities, facts = run_model(path, x)
    expected = engine.evaluate(x)
    assert facts["inputs"] == ["x"] and facts["outputs"] == ["logits", "probabilities"]
    assert np.abs(logits - expected).max() <= TOL * max(1.0, np.abs(expected).max())
    assert np.abs(probabilities - softmax(expected)).max() <= TOL
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    return x, logits, facts


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])  # resnet: BatchNorm running statistics
def test_the_model_gives_the_trained_engines_logits_and_probabilities(exported, tmp_path, rng, name):
    _, folder = exported(name)
    engine = open_engine(folder, OptimizerConfig("sgd", lr=0.1, momentum=0.9), threads=1)
    sparse_masks(engine, rng)
    train(engine, rng)
    path = export_inference(engine, tmp_path / "model.onnx")
    assert path == tmp_path / "model.onnx"
    x, logits, facts = assert_runs_as_engine(engine, path, rng)
    initial = open_engine(folder, threads=1).evaluate(x)
    assert np.abs(logits - initial).max() > 1e-3  # the trained weights, not the exported ones
    assert facts["metadata"] == {"edgecl.engine": "portable", "edgecl.steps_done": "3"}


def test_the_runtime_writes_it_without_torch_or_onnx(exported, tmp_path):
    _, folder = exported("cnn")
    path = tmp_path / "model.onnx"
    assert json.loads(_child(TRAIN_AND_WRITE, folder, path)) == []  # neither module was loaded
    with np.load(str(path) + ".npz") as z:
        x, expected = z["x"], z["logits"]
    logits, probabilities, _ = run_model(path, x)
    assert np.abs(logits - expected).max() <= TOL * max(1.0, np.abs(expected).max())


def test_the_file_is_a_valid_onnx_model_with_the_masked_trained_weights_baked_in(exported, tmp_path, rng):
    onnx = pytest.importorskip("onnx", reason="the onnx package checks the file (not on the emulated board)")
    from onnx import numpy_helper

    _, folder = exported("resnet")
    engine = open_engine(folder, OptimizerConfig("sgd", lr=0.1), threads=1)
    masks = sparse_masks(engine, rng, density=0.3)
    train(engine, rng)
    proto = onnx.load(str(export_inference(engine, tmp_path / "model.onnx")))
    onnx.checker.check_model(proto, full_check=True)
    graph = proto.graph
    assert [i.name for i in graph.input] == ["x"] and [o.name for o in graph.output] == ["logits", "probabilities"]
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    with np.load(folder / "init_state.npz") as z:
        initial = {k: z[k] for k in z.files}
    for name, value in engine.parameters().items():
        baked = inits[f"param::{name}"]
        assert np.array_equal(baked, value)
        assert not np.array_equal(baked, initial[f"param::{name}"])  # trained
        if name in masks:
            assert np.all(baked[masks[name] == 0] == 0) and np.count_nonzero(baked) <= masks[name].sum()
    for name, value in engine.buffers().items():
        assert np.array_equal(inits[f"buffer::{name}"], value)
        assert not np.array_equal(value, initial[f"buffer::{name}"])
    # a mask is no tensor of its own: it is ConstantOfShape(1) of the weight's shape, kept as its int64 dims
    mask_inits = {n: v.tolist() for n, v in inits.items() if n.startswith("mask::")}
    assert mask_inits == {f"mask::{n}::shape": list(m.shape) for n, m in masks.items()}
    ones = [n for n in graph.node if n.op_type == "ConstantOfShape"]
    assert sorted(n.output[0] for n in ones) == sorted(f"mask::{n}" for n in masks)
    softmax_node = graph.node[-1]
    assert softmax_node.op_type == "Softmax" and list(softmax_node.input) == ["logits"]
    assert [(a.name, a.i) for a in softmax_node.attribute] == [("axis", 1)]


def test_a_second_export_of_the_same_state_is_the_same_file(exported, tmp_path, rng):
    _, folder = exported("cnn")
    engine = open_engine(folder, threads=1)
    train(engine, rng, steps=1)
    first = export_inference(engine, tmp_path / "a.onnx").read_bytes()
    assert export_inference(engine, tmp_path / "b.onnx").read_bytes() == first
    train(engine, rng, steps=1)
    assert export_inference(engine, tmp_path / "b.onnx").read_bytes() != first  # replaced: the new weights


@pytest.mark.torch  # the channel-structured export is made here
def test_a_channel_structured_engine_exports_its_active_channels(tmp_path, rng):
    import torch

    from edgecl.exporters import export

    folder = tmp_path / "art"
    export(make_model("cnn"), torch.randn(4, *IN_SHAPE), folder, structure="channel", masks="weights")
    engine = open_engine(folder, OptimizerConfig("sgd", lr=0.1), threads=1)
    sparse_masks(engine, rng)
    engine.set_channels({s: np.sort(rng.choice(n, n // 2, replace=False)) for s, n in engine.channel_sets.items()})
    train(engine, rng)
    assert_runs_as_engine(engine, export_inference(engine, tmp_path / "model.onnx"), rng)


@pytest.fixture(scope="module")
def latent_folders(tmp_path_factory):
    """(full export, export split after layer "2") of the same cnn (masks on the weights)."""
    import torch

    from edgecl.exporters import export

    root = tmp_path_factory.mktemp("latent")
    x = torch.randn(4, *IN_SHAPE)
    export(make_model("cnn"), x, root / "full", masks="weights")
    export(make_model("cnn"), x, root / "split", masks="weights", split="2")
    return root / "full", root / "split"


@pytest.mark.torch  # the split export is made here
def test_latent_replay_exports_the_full_model_then_prefix_and_suffix_as_one(latent_folders, tmp_path, rng):
    full_folder, split_folder = latent_folders
    opt = OptimizerConfig("sgd", lr=0.1)
    full, suffix = open_engine(full_folder, opt, threads=1), open_engine(split_folder, opt, threads=1)
    engine = LatentReplay(suffix, PrefixEncoder(split_folder, suffix.manifest, threads=1), full, freeze_after=0)
    train(full, rng)
    assert_runs_as_engine(engine, export_inference(engine, tmp_path / "before.onnx"), rng)
    engine.freeze()  # the prefix takes the full engine's trained weights
    sparse_masks(suffix, rng)
    for _ in range(3):
        x = rng.standard_normal((16, *IN_SHAPE), dtype=np.float32)
        engine.step(engine.encode(x), rng.integers(0, 10, 16))
    path = export_inference(engine, tmp_path / "after.onnx")
    assert_runs_as_engine(engine, path, rng)
    with pytest.raises(ValueError, match=r"latent-replay export after split '2'.*accepted: the LatentReplay"):
        export_inference(suffix, tmp_path / "suffix.onnx")
    assert not (tmp_path / "suffix.onnx").exists()


@pytest.mark.ort_training
@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_an_ort_training_engine_exports_a_model_stock_onnxruntime_runs(exported, tmp_path, rng, name):
    _, folder = exported(name, "ort-training")
    engine = open_engine(folder, OptimizerConfig("sgd", lr=0.1, momentum=0.9), threads=1)
    sparse_masks(engine, rng)
    train(engine, rng)
    path = export_inference(engine, tmp_path / "model.onnx")
    x, logits, facts = assert_runs_as_engine(engine, path, rng)
    assert np.abs(logits - open_engine(folder, threads=1).evaluate(x)).max() > 1e-3
    assert facts["metadata"] == {"edgecl.engine": "ort-training", "edgecl.steps_done": "3"}
    assert facts["ort"] != "1.19.2" or CHILD_PYTHON == sys.executable  # stock onnxruntime ran it


def test_bad_paths_and_engines_are_refused_before_anything_is_written(exported, tmp_path):
    _, folder = exported("mlp")
    engine = open_engine(folder, threads=1)
    (tmp_path / "a_file").write_text("")
    cases = [
        (tmp_path / "model.ort", ValueError, r"suffix '\.ort'; accepted: \.onnx"),
        (tmp_path / "model", ValueError, r"suffix '\(none\)'; accepted: \.onnx"),
        (tmp_path / "folder.onnx", ValueError, r"is a folder; accepted: a file path"),
        (tmp_path / "a_file" / "model.onnx", ValueError, r"cannot create its folder"),
        (b"model.onnx", TypeError, r"path is a bytes; accepted: a str or pathlib.Path"),
    ]
    (tmp_path / "folder.onnx").mkdir()
    for path, error, message in cases:
        with pytest.raises(error, match=message):
            export_inference(engine, path)
    with pytest.raises(TypeError, match=r"engine is a str; accepted: a PortableEngine or OrtTrainingEngine"):
        export_inference("engine", tmp_path / "model.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "folder.onnx"]


def test_a_model_past_protobufs_limit_is_refused_and_the_old_file_kept(exported, tmp_path, monkeypatch):
    _, folder = exported("mlp")
    engine = open_engine(folder, threads=1)
    path = export_inference(engine, tmp_path / "model.onnx")
    before = path.read_bytes()
    monkeypatch.setattr(inference_model, "MAX_MODEL_BYTES", len(before) - 1)
    with pytest.raises(UnsupportedModelError, match=rf"would be {len(before)} bytes; accepted: at most "
                                                    rf"{len(before) - 1} \(protobuf's 2 GiB limit"):
        export_inference(engine, path)
    weights = sum(v.nbytes for v in engine.parameters().values()) + sum(v.nbytes for v in engine.buffers().values())
    monkeypatch.setattr(inference_model, "MAX_MODEL_BYTES", weights - 1)  # refused before the file is built
    with pytest.raises(UnsupportedModelError, match=rf"would be at least {weights} bytes; accepted: at most"):
        export_inference(engine, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary file left


def test_a_graph_file_altered_after_the_engine_opened_is_refused(exported, tmp_path):
    _, folder = exported("mlp")
    copy = shutil.copytree(folder, tmp_path / "art")
    engine = open_engine(copy, threads=1)
    with open(copy / "forward.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match=r"forward\.onnx' is not the file the engine's manifest lists"):
        export_inference(engine, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
