"""Parity of the portable engine with eager torch, from the same initial weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgecl.exporters.reference import TorchEngine
from edgecl.runtime import OptimizerConfig, open_engine
from tests.helpers import FAMILIES, batch, rel_err, rel_norm

TOL = 1e-4
SGD = OptimizerConfig("sgd", lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
ADAMW = OptimizerConfig("adamw", lr=1e-3, weight_decay=0.01)


def _pair(exported, name, optimizer, engine="portable", **kw):
    model, folder = exported(name, engine, **kw)
    return open_engine(folder, optimizer, threads=2), TorchEngine.from_artifacts(model, folder, optimizer)


def _random_masks(engine, rng, density=0.5):
    return {n: (rng.random(m.shape) < density).astype(np.float32) for n, m in engine.masks().items()}


@pytest.mark.parametrize("name", FAMILIES)
def test_loss_and_every_gradient_match_torch(exported, rng, name):
    eng, ref = _pair(exported, name, SGD)
    for n in (1, 7, 32):  # the batch dimension is dynamic
        x, y = batch(rng, n)
        w = rng.random(n).astype(np.float32)
        t = rng.standard_normal((n, 10)).astype(np.float32)
        v = rng.random(n).astype(np.float32)
        loss, grads = eng.loss_and_grads(x, y, w, t, v)
        ref_loss, ref_grads = ref.loss_and_grads(x, y, w, t, v)
        assert rel_err(loss, ref_loss) <= TOL
        assert grads.keys() == ref_grads.keys()
        for k in ref_grads:
            assert rel_err(grads[k], ref_grads[k]) <= TOL, (n, k)
    for k, b in ref.buffers().items():  # BatchNorm running statistics follow torch's update
        assert rel_err(eng.buffers()[k], b) <= TOL, k


@pytest.mark.parametrize("optimizer", [SGD, ADAMW], ids=["sgd", "adamw"])
@pytest.mark.parametrize("name", FAMILIES)
def test_weights_match_torch_after_20_steps_with_masks(exported, rng, name, optimizer):
    eng, ref = _pair(exported, name, optimizer)
    masks = _random_masks(eng, rng)
    eng.set_masks(masks)
    ref.set_masks(masks)
    for _ in range(20):
        x, y = batch(rng)
        eng.step(x, y)
        ref.step(x, y)
    params, ref_params = eng.parameters(), ref.parameters()
    for k in ref_params:
        assert rel_norm(params[k], ref_params[k]) <= TOL, k
    for k, m in masks.items():
        assert (params[k][m == 0] == 0).all(), k
    x, y = batch(rng)
    _, grads = eng.loss_and_grads(x, y)
    ref.loss_and_grads(x, y)  # a training forward: both move their BatchNorm statistics
    for k, m in masks.items():
        assert (grads[k][m == 0] == 0).all(), k
    x, _ = batch(rng, 16)
    assert rel_norm(eng.evaluate(x), ref.evaluate(x)) <= TOL


def test_every_trainable_weight_changes_after_one_step(exported, rng):
    eng, _ = _pair(exported, "resnet", OptimizerConfig("sgd", lr=0.1))
    before = eng.parameters()
    eng.step(*batch(rng))
    after = eng.parameters()
    for k in before:
        assert not np.array_equal(before[k], after[k]), f"{k} did not train"


def test_frozen_parameters_get_no_gradient_output_and_do_not_move(exported, rng):
    trainable = ["linear.weight", "linear.bias", "layers.2.conv2.weight"]
    model, folder = exported("resnet", trainable=trainable)
    graph = onnx.load(str(folder / "step.onnx"), load_external_data=False).graph
    assert sorted(o.name for o in graph.output if o.name.startswith("grad::")) == sorted(f"grad::{t}" for t in trainable)
    eng = open_engine(folder, SGD)
    ref = TorchEngine.from_artifacts(model, folder, SGD)
    before = eng.parameters()
    for _ in range(5):
        x, y = batch(rng)
        eng.step(x, y)
        ref.step(x, y)
    after, ref_after = eng.parameters(), ref.parameters()
    for k in before:
        if k in trainable:
            assert not np.array_equal(before[k], after[k])
            assert rel_err(after[k], ref_after[k]) <= TOL
        else:
            assert np.array_equal(before[k], after[k]), k


def test_step_graph_is_standard_onnx_at_opset_21_or_less(exported):
    _, folder = exported("mobilenet")
    for graph_file in ("step.onnx", "forward.onnx"):
        proto = onnx.load(str(folder / graph_file))
        domains = {n.domain for n in proto.graph.node}
        assert domains <= {"", "ai.onnx"}, domains
        assert all(o.version <= 21 for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        assert proto.ir_version <= 10
        onnx.checker.check_model(proto)


def test_save_and_load_continue_identically(exported, rng, tmp_path):
    _, folder = exported("cnn")
    eng = open_engine(folder, ADAMW)
    for _ in range(3):
        eng.step(*batch(rng))
    eng.save(tmp_path / "state.npz")
    xs = [batch(rng) for _ in range(3)]
    losses = [eng.step(*b) for b in xs]
    resumed = open_engine(folder, ADAMW, state=tmp_path / "state.npz")
    assert resumed.steps_done == 3
    assert [resumed.step(*b) for b in xs] == losses
    for k, v in eng.parameters().items():
        assert np.array_equal(v, resumed.parameters()[k])


def test_export_logs_no_torch_onnx_warnings(tmp_path, caplog):
    import logging

    import torch

    from tests.helpers import make_model

    with caplog.at_level(logging.WARNING):
        from edgecl.exporters import export

        export(make_model("resnet"), torch.randn(2, 1, 8, 8), tmp_path / "a")
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("torch.onnx")][:3]


def test_step_graph_inputs_have_a_batch_dimension_named_n(exported):
    _, folder = exported("cnn")
    graph = onnx.load(str(folder / "step.onnx"), load_external_data=False).graph
    batch = {i.name: i.type.tensor_type.shape.dim[0].dim_param for i in graph.input if i.name in ("x", "y")}
    assert batch == {"x": "N", "y": "N"}
