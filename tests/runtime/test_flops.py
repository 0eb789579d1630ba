"""SparCL-style training FLOPs: literal layer tables, and dense counts against torch's FLOP counter."""

from __future__ import annotations

import pytest

from edgecl.runtime.flops import FlopsBreakdown, dense_training_flops, training_flops

LAYERS = [
    {"weight": "0.weight", "macs_per_sample": 100, "needs_input_grad": False},
    {"weight": "2.weight", "macs_per_sample": 1000, "needs_input_grad": True},
    {"weight": "4.weight", "macs_per_sample": 50, "needs_input_grad": True},
]


def test_dense_literal():
    f = dense_training_flops(LAYERS, samples=10)
    assert isinstance(f, FlopsBreakdown) and f.samples == 10
    assert f.forward == 2 * 1150 * 10
    assert f.input_grad == 2 * 1050 * 10  # the first layer computes no input gradient
    assert f.weight_grad == 2 * 1150 * 10
    assert f.total == 67_000 and f.backward == 44_000
    assert [row.input_grad for row in f.layers] == [0.0, 20_000.0, 1_000.0]


def test_sparse_literal():
    f = training_flops(LAYERS, samples=10, weight_density={"2.weight": 0.25},
                       grad_density={"2.weight": 0.2, "4.weight": 0.5}, frozen={"0.weight"})
    rows = {r.weight: (r.forward, r.input_grad, r.weight_grad) for r in f.layers}
    assert rows == {
        "0.weight": (2000.0, 0.0, 0.0),        # frozen: forward only
        "2.weight": (5000.0, 5000.0, 4000.0),  # 20000 * 0.25 forward and input-grad, 20000 * 0.2 weight-grad
        "4.weight": (1000.0, 1000.0, 500.0),
    }
    assert (f.forward, f.input_grad, f.weight_grad, f.total) == (8000.0, 6000.0, 4500.0, 18_500.0)
    d = f.to_dict()
    assert d["total"] == 18_500.0 and d["layers"][1]["weight_grad"] == 4000.0


def test_samples_scale_linearly_and_zero_is_zero():
    assert dense_training_flops(LAYERS, 0).total == 0.0
    assert dense_training_flops(LAYERS, 7).total == pytest.approx(7 * dense_training_flops(LAYERS, 1).total)


def test_errors_name_the_bad_value():
    with pytest.raises(KeyError, match="'9.weight'"):
        training_flops(LAYERS, 1, weight_density={"9.weight": 0.5})
    with pytest.raises(KeyError, match="frozen names"):
        training_flops(LAYERS, 1, frozen={"nope"})
    with pytest.raises(ValueError, match=r"grad_density\['2.weight'\] = 1.5"):
        training_flops(LAYERS, 1, grad_density={"2.weight": 1.5})
    with pytest.raises(ValueError, match="samples=-1"):
        training_flops(LAYERS, -1)
    with pytest.raises(KeyError, match=r"layers\[0\] lacks \['needs_input_grad'\]"):
        training_flops([{"weight": "w", "macs_per_sample": 1}], 1)
    with pytest.raises(ValueError, match="non-empty list"):
        training_flops([], 1)


@pytest.mark.torch
@pytest.mark.parametrize("family", ["mlp", "cnn", "cnn-s2", "resnet", "mobilenet"])
def test_dense_training_step_matches_torch_flop_counter(family):
    """Forward + backward of a full training step, dense, against FlopCounterMode.

    torch counts what autograd runs: for the first layer, whose input needs no gradient,
    `convolution_backward` / `mm` compute the weight gradient only, exactly as we count.
    torch 2.13's counter prices the input-gradient of a grouped convolution as if it were
    dense, groups times too high (a depthwise 3x3 layer's backward as 1 + groups forwards);
    MobileNet's comparison adds that overcount explicitly, and also accepts a torch that
    has fixed it.
    """
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode

    from edgecl.exporters.layers import layer_table
    from tests.helpers import make_model

    model = make_model(family).train()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    table = layer_table(model, x)
    mine = dense_training_flops(table, samples=8)
    theirs = counter.get_total_flops()
    torch_overcount = sum((r["groups"] - 1) * 2 * r["macs_per_sample"] * 8 for r in table if r["needs_input_grad"])
    assert (family == "mobilenet") == (torch_overcount > 0)
    assert mine.total == pytest.approx(theirs, rel=0.01) or mine.total + torch_overcount == pytest.approx(theirs, rel=0.01)

    # the first layer: torch's backward there is the weight gradient alone
    assert not table[0]["needs_input_grad"] and all(row["needs_input_grad"] for row in table[1:])
    assert mine.layers[0].input_grad == 0.0
    if family == "cnn":
        per_op = {str(op): n for op, n in counter.get_flop_counts()["Sequential.0"].items()}
        assert per_op["aten.convolution_backward"] == mine.layers[0].weight_grad == mine.layers[0].forward


# --- optimizer work, SparsityConfig and whole runs ----------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from edgecl.runtime.flops import (SparsityConfig, optimizer_flops, optimizer_flops_per_element,  # noqa: E402
                                  training_run_flops)
from edgecl.runtime.optim import OptimizerConfig  # noqa: E402

# the same three layers with sizes: 0 conv-like (4 weights + bias 2), 2 (20 + 5), 4 (10, no bias)
TABLE = [
    {"weight": "0.weight", "bias": "0.bias", "weight_shape": [2, 2], "macs_per_sample": 100, "needs_input_grad": False},
    {"weight": "2.weight", "bias": "2.bias", "weight_shape": [5, 4], "macs_per_sample": 1000, "needs_input_grad": True},
    {"weight": "4.weight", "bias": None, "weight_shape": [2, 5], "macs_per_sample": 50, "needs_input_grad": True},
]


def test_optimizer_flops_per_element_follows_the_update_formulas():
    assert optimizer_flops_per_element(OptimizerConfig()) == 2                       # w -= lr * g
    assert optimizer_flops_per_element(OptimizerConfig(weight_decay=1e-4)) == 4      # + g + wd * w
    assert optimizer_flops_per_element(OptimizerConfig(momentum=0.9)) == 5           # + buf * m + (1 - d) * g
    assert optimizer_flops_per_element(OptimizerConfig(momentum=0.9, nesterov=True)) == 7
    assert optimizer_flops_per_element(OptimizerConfig("adamw")) == 13
    assert optimizer_flops_per_element(OptimizerConfig("adamw", weight_decay=0.01)) == 14


def test_optimizer_flops_literal_density_frozen_and_shared_weights():
    opt = optimizer_flops(TABLE, steps=3, optimizer=OptimizerConfig(), update_density={"2.weight": 0.25})
    assert opt == {"0.weight": 2 * 3 * (4 + 2), "2.weight": 2 * 3 * (20 * 0.25 + 5), "4.weight": 2 * 3 * 10}
    frozen = optimizer_flops(TABLE, 1, OptimizerConfig("adamw"), frozen={"0.weight"})
    assert frozen["0.weight"] == 0.0 and frozen["2.weight"] == 13 * 25
    shared = optimizer_flops([TABLE[2], TABLE[2]], 1, OptimizerConfig())
    assert shared == {"4.weight": 20.0}  # counted once
    with pytest.raises(KeyError, match="weight_shape"):
        optimizer_flops(LAYERS, 1, OptimizerConfig())


def test_training_run_flops_literal_step_epoch_run():
    cfg = SparsityConfig(weight_sparsity=0.75, grad_density=0.2, data_removal=0.25)
    r = training_run_flops(TABLE, cfg, batch=8, replay=4, examples_per_epoch=100, epochs=2, tasks=3)
    # first and last layer dense; only 2.weight is sparse. 75 examples kept -> 10 steps (last one short)
    assert r.steps_per_epoch == 10
    assert (r.step.samples, r.step.steps) == (12, 1)
    assert (r.epoch.samples, r.epoch.steps) == (75 + 4 * 10, 10)
    assert (r.run.samples, r.run.steps) == (115 * 6, 60)
    rows = {row.weight: row for row in r.step.layers}
    assert (rows["2.weight"].forward, rows["2.weight"].input_grad, rows["2.weight"].weight_grad) == (
        2 * 1000 * 12 * 0.25, 2 * 1000 * 12 * 0.25, 2 * 1000 * 12 * 0.2)
    assert rows["2.weight"].optimizer == 2 * (20 * 0.2 + 5)  # min(weight density, grad density) of the entries
    assert rows["0.weight"].forward == 2 * 100 * 12 and rows["0.weight"].input_grad == 0.0
    assert r.run.total == pytest.approx(r.epoch.total * 6)
    assert r.step.total == r.step.forward + r.step.input_grad + r.step.weight_grad + r.step.optimizer
    d = r.to_dict()
    assert d["run"]["optimizer"] == r.run.optimizer and d["sparsity"]["weight_sparsity"] == 0.75


def test_computed_density_scales_every_layer_and_its_updates():
    """A channel-structured graph's shares, the stem and classifier included (not SparCL's dense ends)."""
    share = {"0.weight": 0.5, "2.weight": 0.25, "4.weight": 0.5}
    r = training_run_flops(TABLE, batch=4, examples_per_epoch=4, computed_density=share).step
    rows = {row.weight: row for row in r.layers}
    assert (rows["0.weight"].forward, rows["0.weight"].input_grad) == (2 * 100 * 4 * 0.5, 0.0)
    assert (rows["2.weight"].forward, rows["2.weight"].weight_grad) == (2 * 1000 * 4 * 0.25, 2 * 1000 * 4 * 0.25)
    assert rows["2.weight"].optimizer == 2 * (20 * 0.25 + 5) and rows["4.weight"].optimizer == 2 * 10 * 0.5
    ones = training_run_flops(TABLE, batch=4, examples_per_epoch=4, computed_density=dict.fromkeys(share, 1.0))
    assert ones.step.to_dict() == training_run_flops(TABLE, batch=4, examples_per_epoch=4).step.to_dict()
    with pytest.raises(ValueError, match="computed_density with weight_sparsity=0.5"):
        training_run_flops(TABLE, SparsityConfig(0.5), computed_density=share)
    with pytest.raises(ValueError, match=r"computed_density\['2.weight'\] = 1.5"):
        training_run_flops(TABLE, computed_density={"2.weight": 1.5})
    with pytest.raises(KeyError, match="computed_density names \\['9.weight'\\]"):
        training_run_flops(TABLE, computed_density={"9.weight": 0.5})


def test_dense_run_without_optimizer_work_is_the_sparcl_count():
    r = training_run_flops(TABLE, batch=10, examples_per_epoch=50)
    assert r.epoch.total - r.epoch.optimizer == dense_training_flops(TABLE, 50).total


def test_all_sparse_and_frozen():
    dense_ends = training_run_flops(TABLE, SparsityConfig(0.5), batch=1, examples_per_epoch=1)
    all_sparse = training_run_flops(TABLE, SparsityConfig(0.5, dense_first_last=False), batch=1, examples_per_epoch=1)
    assert all_sparse.step.forward == 0.5 * dense_ends.step.layers[0].forward + dense_ends.step.layers[1].forward + (
        0.5 * dense_ends.step.layers[2].forward)
    frozen = training_run_flops(TABLE, SparsityConfig(frozen=("2.weight",)), batch=1, examples_per_epoch=1)
    assert frozen.step.layers[1].weight_grad == 0.0 and frozen.step.layers[1].optimizer == 0.0
    assert frozen.step.layers[1].input_grad > 0  # earlier layers still need the gradient through it


def test_sparsity_config_errors_name_the_value():
    with pytest.raises(ValueError, match=r"grad_density=-0.1; accepted: a number in \[0, 1\]"):
        SparsityConfig(grad_density=-0.1)
    with pytest.raises(ValueError, match=r"weight_sparsity=1.0; accepted: a number in \[0, 1\)"):
        SparsityConfig(weight_sparsity=1.0)
    with pytest.raises(ValueError, match="data_removal=-0.5"):
        SparsityConfig(data_removal=-0.5)
    with pytest.raises(ValueError, match="frozen='0.weight'"):
        SparsityConfig(frozen="0.weight")
    with pytest.raises(KeyError, match="'nope'"):
        training_run_flops(TABLE, SparsityConfig(frozen=("nope",)))
    with pytest.raises(ValueError, match="batch=0"):
        training_run_flops(TABLE, batch=0)
    with pytest.raises(ValueError, match="replay=-1"):
        training_run_flops(TABLE, replay=-1)
    assert SparsityConfig.from_dict(SparsityConfig(0.9, 0.2, 0.3, ("2.weight",)).to_dict()) == SparsityConfig(
        0.9, 0.2, 0.3, ("2.weight",))


fractions = st.floats(0.0, 0.99, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(s=fractions, ds=fractions, g=st.floats(0.0, 1.0), dg=st.floats(0.0, 1.0), r=fractions, dr=fractions,
       frozen=st.sets(st.sampled_from([t["weight"] for t in TABLE])), more_frozen=st.booleans(),
       all_sparse=st.booleans(), adam=st.booleans())
def test_property_a_sparser_config_never_has_more_flops(s, ds, g, dg, r, dr, frozen, more_frozen, all_sparse, adam):
    base = SparsityConfig(s, g, r, tuple(sorted(frozen)), not all_sparse)
    sparser = SparsityConfig(min(s + ds, 0.99), g * (1 - dg), min(r + dr, 0.99),
                             tuple(sorted(frozen | ({"2.weight"} if more_frozen else set()))), not all_sparse)
    opt = OptimizerConfig("adamw" if adam else "sgd")
    a = training_run_flops(TABLE, base, batch=7, replay=3, examples_per_epoch=50, epochs=2, optimizer=opt)
    b = training_run_flops(TABLE, sparser, batch=7, replay=3, examples_per_epoch=50, epochs=2, optimizer=opt)
    for scope in ("step", "epoch", "run"):
        x, y = getattr(a, scope), getattr(b, scope)
        for phase in ("forward", "input_grad", "weight_grad", "optimizer", "total"):
            assert getattr(y, phase) <= getattr(x, phase) * (1 + 1e-12) + 1e-9, (scope, phase)


def test_weight_gradient_density_counts_only_active_entries_kept_by_dgm():
    wd, gd = SparsityConfig(0.9, 0.2).densities(TABLE)
    assert list(wd) == list(gd) == ["2.weight"] and wd["2.weight"] == pytest.approx(0.1)
    assert gd["2.weight"] == pytest.approx(0.1)  # a masked weight's gradient is 0: min(0.1 active, 0.2 kept)
    assert SparsityConfig(0.5, 0.2).densities(TABLE)[1] == {"2.weight": 0.2}
    assert SparsityConfig(0.75).densities(TABLE)[1] == {"2.weight": 0.25}  # no DGM: the active entries
