"""The channel-structured step graph (`export(..., structure="channel")`) against the dense one.

From the same weights, the structured graph at a channel subset must give the loss, logits,
gradients and BatchNorm statistics of the dense graph whose masks zero the inactive channels,
restricted to the active channels; any subset runs without a re-export; the full sets give the
dense graph's results.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgecl.exporters import export
from edgecl.exporters.channel_plan import plan_channels
from edgecl.runtime import OptimizerConfig, open_engine
from edgecl.runtime.channels import take
from edgecl.runtime.errors import ArtifactError, UnsupportedModelError
from tests.helpers import IN_SHAPE, batch, make_model, rel_err

TOL = 1e-4
SGD = OptimizerConfig("sgd", lr=0.05, momentum=0.9, weight_decay=1e-3)
# conv + linear after Flatten (cnn-s2), residual adds + BatchNorm (resnet), depthwise + BatchNorm (mobilenet)
STRUCTURED = ("cnn-s2", "resnet", "mobilenet", "mlp", "resnet-28x28")


# a stride-2 layer over 196 output pixels: conv_grads would pick the im2col whose Conv has a group per channel
WIDE_INPUT = {"resnet-28x28": ("resnet", (1, 28, 28), {"width": 8, "blocks": (1, 1)})}


def _model(name):
    from edgecl.exporters.models import build_model
    from tests.helpers import perturb_batchnorm

    if name not in WIDE_INPUT:
        return make_model(name), IN_SHAPE
    family, shape, kw = WIDE_INPUT[name]
    return perturb_batchnorm(build_model(family, in_shape=shape, num_classes=10, **kw)), shape


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """pair(name) -> (structured engine folder, dense masked folder), one export each per module."""
    cache = {}

    def get(name):
        if name not in cache:
            root = tmp_path_factory.mktemp(f"structured-{name}")
            model, shape = _model(name)
            x = torch.randn(4, *shape)
            export(model, x, root / "structured", structure="channel", masks="weights")
            export(model, x, root / "dense", masks="weights")
            cache[name] = (root / "structured", root / "dense")
        return cache[name]

    return get


def _subset(rng, sets, density):
    return {s: np.sort(rng.choice(n, max(1, round(density * n)), replace=False)).astype(np.int64)
            for s, n in sets.items()}


def _dense_masks(eng, gathers, index):
    """0/1 masks that zero every inactive row and column of the masked weights."""
    masks = {}
    for name, shape in eng.mask_shapes.items():
        keep = np.zeros(shape, bool)
        rows, cols, repeat = gathers.get(name, (None, None, 1))
        r = np.arange(shape[0]) if rows is None else index[rows]
        c = np.arange(shape[1]) if cols is None else (index[cols][:, None] * repeat + np.arange(repeat)).reshape(-1)
        keep[np.ix_(r, c)] = True
        masks[name] = keep.astype(np.float32)
    return masks


def _batch(rng, n, shape):
    return rng.standard_normal((n, *shape), dtype=np.float32), rng.integers(0, 10, n)


def _compare(structured, dense, rng, n=7):
    gathers, index = structured._gathers, structured.channels()
    shape = structured.manifest.input_shape
    x, y = _batch(rng, n, shape)
    w = rng.random(n).astype(np.float32)
    t = rng.standard_normal((n, 10)).astype(np.float32)
    v = rng.random(n).astype(np.float32)
    loss, grads = structured.loss_and_grads(x, y, w, t, v)
    ref_loss, ref_grads = dense.loss_and_grads(x, y, w, t, v)
    assert rel_err(loss, ref_loss) <= TOL
    assert rel_err(structured.last_logits, dense.last_logits) <= TOL
    assert grads.keys() == ref_grads.keys()
    for k, g in ref_grads.items():
        rule = gathers.get(k)
        assert rel_err(take(grads[k], rule, index), take(g, rule, index)) <= TOL, k
        if rule is not None:  # the inactive entries get no gradient at all
            assert np.abs(grads[k]).sum() == pytest.approx(np.abs(take(grads[k], rule, index)).sum(), rel=1e-6), k
    buffers, ref_buffers = structured.buffers(), dense.buffers()
    for k, b in ref_buffers.items():
        assert rel_err(take(buffers[k], gathers.get(k), index), take(b, gathers.get(k), index)) <= TOL, k
    x, _ = _batch(rng, 5, shape)
    assert rel_err(structured.evaluate(x), dense.evaluate(x)) <= TOL


@pytest.mark.parametrize("name", STRUCTURED)
def test_structured_gradients_equal_dense_masked_ones_on_the_active_channels(pair, rng, name):
    s_dir, d_dir = pair(name)
    structured = open_engine(s_dir, SGD, threads=2)
    assert structured.channel_sets  # every family here has prunable channels
    for density in (0.5, 0.25, 0.75):  # one export, one engine, three channel sets
        # a fresh dense engine each time: its masks zero the weights they block for good
        dense = open_engine(d_dir, SGD, threads=2)
        for k, v in structured.buffers().items():
            dense._buffers[k] = v.copy()
        index = _subset(rng, structured.channel_sets, density)
        structured.set_channels(index)
        # unstructured masks still apply inside the active channels
        sparse = {k: (rng.random(m.shape) < 0.8).astype(np.float32) for k, m in structured.masks().items()}
        structured.set_masks(sparse)
        dense.set_parameters(structured.parameters())
        dense.set_masks({k: m * sparse[k] for k, m in _dense_masks(dense, structured._gathers, index).items()})
        _compare(structured, dense, rng)


@pytest.mark.parametrize("name", STRUCTURED)
def test_full_channel_sets_give_the_dense_graphs_results(pair, rng, name):
    s_dir, d_dir = pair(name)
    structured, dense = open_engine(s_dir, SGD, threads=2), open_engine(d_dir, SGD, threads=2)
    x, y = _batch(rng, 9, structured.manifest.input_shape)
    loss, grads = structured.loss_and_grads(x, y)
    ref_loss, ref_grads = dense.loss_and_grads(x, y)
    assert rel_err(loss, ref_loss) <= TOL
    for k in ref_grads:
        assert rel_err(grads[k], ref_grads[k]) <= TOL, k
    for k, b in dense.buffers().items():
        assert rel_err(structured.buffers()[k], b) <= TOL, k


def test_the_gradients_come_out_of_the_graph_compact(pair, rng):
    import onnx

    s_dir, _ = pair("cnn-s2")
    graph = onnx.load(str(s_dir / "step.onnx"), load_external_data=False).graph
    dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output}
    assert dims["grad::2.weight"] == ["k_2", "k_0", 3, 3]
    assert dims["grad::6.weight"][0] == "k_6"  # and its columns: k_2 channels of 2x2 pixels, computed in the graph


def test_plan_of_cnn_s2_follows_the_flatten_and_keeps_stem_input_and_classifier_full():
    plan = plan_channels(make_model("cnn-s2"), torch.randn(2, *IN_SHAPE))
    assert plan.sets == {"0": 16, "2": 32, "6": 64}
    g = plan.gathers
    assert (g["0.weight"].rows, g["0.weight"].cols) == ("0", None)  # the input's channels stay
    assert (g["6.weight"].rows, g["6.weight"].cols, g["6.weight"].repeat) == ("6", "2", 4)  # 32 x 2 x 2 flattened
    assert (g["8.weight"].rows, g["8.weight"].cols) == (None, "6")  # the classifier's outputs stay
    assert "8.bias" not in g


def test_residual_adds_share_one_channel_set():
    plan = plan_channels(make_model("resnet"), torch.randn(2, *IN_SHAPE))
    # the stem, block 0's second conv (identity shortcut) and the classifier's input are one set
    assert plan.gathers["layers.0.conv2.weight"].rows == "conv1"
    assert plan.gathers["layers.1.shortcut.0.weight"].rows == plan.gathers["layers.1.conv2.weight"].rows
    assert plan.gathers["layers.1.shortcut.0.weight"].cols == "conv1"


def test_inactive_channels_keep_weights_and_optimizer_state_then_resume(pair, rng):
    s_dir, _ = pair("resnet")
    eng = open_engine(s_dir, SGD, threads=2)
    eng.step(*batch(rng))  # every slot exists now
    index = _subset(rng, eng.channel_sets, 0.5)
    eng.set_channels(index)
    before, slots_before = eng.parameters(), {k: v.copy() for k, v in eng._optimizer.state_arrays().items()}
    for _ in range(3):
        eng.step(*batch(rng))
    after, slots_after = eng.parameters(), eng._optimizer.state_arrays()
    for k, g in eng._gathers.items():
        if k not in before:
            continue  # a BatchNorm statistic
        active = np.zeros(before[k].shape, bool)
        active[tuple(np.ix_(*[a for a in _active_axes(g, index, before[k].shape)]))] = True
        assert np.array_equal(before[k][~active], after[k][~active]), k
        assert not np.array_equal(before[k][active], after[k][active]), k
        slot = f"optim::momentum::{k}"
        assert np.array_equal(slots_before[slot][~active], slots_after[slot][~active]), k
    eng.set_channels({s: np.arange(n) for s, n in eng.channel_sets.items()})  # regrow everything: no re-export
    eng.step(*batch(rng))
    assert all(not np.array_equal(after[k], v) for k, v in eng.parameters().items() if k in eng._gathers)


def _active_axes(g, index, shape):
    rows, cols, repeat = g
    r = np.arange(shape[0]) if rows is None else index[rows]
    if len(shape) == 1:
        return [r]
    c = np.arange(shape[1]) if cols is None else (index[cols][:, None] * repeat + np.arange(repeat)).reshape(-1)
    return [r, c]


@pytest.mark.parametrize("bad, error, words", [
    ({"0": np.array([3, 99])}, ValueError, "holds 99; accepted: indices in [0, 16)"),
    ({"0": np.array([-1, 2])}, ValueError, "holds -1"),
    ({"0": np.array([2, 2, 5])}, ValueError, "repeats 2, 2"),
    ({"0": np.array([5, 2])}, ValueError, "is unsorted at 5, 2"),
    ({"0": np.array([], np.int64)}, ValueError, "non-empty 1-D"),
    ({"0": np.array([[1, 2]])}, ValueError, "non-empty 1-D"),
    ({"0": np.array([1.0, 2.0])}, TypeError, "dtype float64; accepted: an integer dtype"),
    ({"nope": np.array([1])}, KeyError, "no such channel set; accepted: 0, 2, 6"),
    ([np.array([1])], TypeError, "a dict of set name"),
])
def test_bad_channel_indices_are_refused_before_anything_changes(pair, bad, error, words):
    s_dir, _ = pair("cnn-s2")
    eng = open_engine(s_dir, SGD)
    eng.set_channels({"2": np.array([0, 4, 7])})
    with pytest.raises(error) as info:
        eng.set_channels({"2": np.array([1, 2]), **bad} if isinstance(bad, dict) else bad)
    assert words in str(info.value)
    assert np.array_equal(eng.channels()["2"], [0, 4, 7])  # not even the valid entry of the same call


def test_save_and_load_resume_exactly_with_the_active_channels(pair, rng, tmp_path):
    s_dir, _ = pair("resnet")
    eng = open_engine(s_dir, SGD)
    eng.set_channels(_subset(rng, eng.channel_sets, 0.5))
    eng.step(*batch(rng))
    eng.save(tmp_path / "state.npz")
    batches = [batch(rng) for _ in range(2)]
    losses = [eng.step(*b) for b in batches]
    resumed = open_engine(s_dir, SGD, state=tmp_path / "state.npz")
    for s, v in eng.channels().items():
        assert np.array_equal(resumed.channels()[s], v)
    assert [resumed.step(*b) for b in batches] == losses
    arrays = dict(np.load(tmp_path / "state.npz"))
    arrays["channels::conv1"] = np.array([3, 1], np.int64)
    with pytest.raises(ArtifactError, match="unsorted"):
        open_engine(s_dir, SGD).load_state_arrays(arrays)


def test_export_refuses_what_structure_channel_cannot_do_before_writing(tmp_path):
    x = torch.randn(2, *IN_SHAPE)
    with pytest.raises(ValueError, match="structure='rows'; accepted: None, 'channel'"):
        export(make_model("cnn"), x, tmp_path / "a", structure="rows")
    with pytest.raises(ValueError, match="accepted: structure='channel' with engine='portable'"):
        export(make_model("cnn"), x, tmp_path / "b", structure="channel", engine="ort-training")
    grouped = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(4, 4, 3, groups=2), torch.nn.Flatten(),
                                  torch.nn.Linear(64, 10))
    with pytest.raises(UnsupportedModelError, match="grouped Conv2d"):
        export(grouped, x, tmp_path / "c", structure="channel")
    pooled = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AvgPool2d(2), torch.nn.Flatten(),
                                 torch.nn.Linear(36, 10))
    with pytest.raises(UnsupportedModelError, match="layer '1' is AvgPool2d; accepted: Conv2d, Linear"):
        export(pooled, x, tmp_path / "d", structure="channel")
    assert not any(tmp_path.iterdir())


def test_planning_leaves_the_model_and_its_batchnorm_statistics_alone():
    model = make_model("resnet").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan_channels(model, torch.randn(4, *IN_SHAPE))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_manifest_refuses_a_gather_that_does_not_fit_its_set(pair):
    import json

    from edgecl.runtime.manifest_schema import check_manifest_dict

    s_dir, _ = pair("cnn-s2")
    d = json.loads((s_dir / "manifest.json").read_text())
    check_manifest_dict(d, "ok")
    d["extra"]["channels"]["gathers"]["6.weight"][2] = 5  # 32 channels x 5 columns is not 6.weight's 128
    with pytest.raises(ArtifactError, match=r"extra.channels.gathers\['6.weight'\]"):
        check_manifest_dict(d, "edited")
    d["extra"]["channels"]["gathers"]["6.weight"] = ["6", "nope", 4]
    with pytest.raises(ArtifactError, match="sets among"):
        check_manifest_dict(d, "edited")


def test_apply_gradients_steps_the_gradients_given_even_if_changed_in_place(pair, rng):
    s_dir, _ = pair("cnn-s2")
    eng = open_engine(s_dir, OptimizerConfig("sgd", lr=0.1))
    eng.set_channels(_subset(rng, eng.channel_sets, 0.5))
    before = eng.parameters()
    _, grads = eng.loss_and_grads(*batch(rng))
    for g in grads.values():
        g *= 0.0  # as a gradient mask applied in place would
    eng.apply_gradients(grads)
    for k, v in eng.parameters().items():
        assert np.array_equal(v, before[k]), k
    eng.step(*batch(rng))  # while step() itself moves them
    assert not np.array_equal(eng.parameters()["2.weight"], before["2.weight"])
