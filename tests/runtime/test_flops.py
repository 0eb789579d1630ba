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


@pytest.mark.parametrize("family", ["mlp", "cnn", "resnet", "mobilenet"])
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
