"""The layer table and activation estimate the exporter stores in the manifest."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from edgecl.exporters.layers import activation_bytes_per_sample, layer_table  # noqa: E402
from edgecl.runtime import load_manifest  # noqa: E402
from tests.helpers import FAMILIES, IN_SHAPE, make_model  # noqa: E402


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_flops_match_torch_flop_counter(family):
    model = make_model(family).eval()
    x = torch.randn(4, *IN_SHAPE)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    table = layer_table(model, x)
    ours = 4 * sum(2 * row["macs_per_sample"] for row in table)
    assert ours == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_literal_table_with_groups_stride_and_bias():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),                         # 5x5 -> 4x5x5 = 100 out, 2*9 MACs each
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, bias=False),  # -> 4x3x3 = 36 out, 1*9 each
        nn.Flatten(),
        nn.Linear(36, 3),                                      # 3 out, 36 each
    )
    rows = layer_table(model, torch.randn(2, 2, 5, 5))
    assert [(r["path"], r["kind"], r["weight"], r["bias"]) for r in rows] == [
        ("0", "Conv2d", "0.weight", "0.bias"), ("2", "Conv2d", "2.weight", None), ("4", "Linear", "4.weight", "4.bias")]
    assert [r["macs_per_sample"] for r in rows] == [100 * 18, 36 * 9, 3 * 36]
    assert [(r["in_elements"], r["out_elements"]) for r in rows] == [(50, 100), (100, 36), (36, 3)]
    assert [r["groups"] for r in rows] == [1, 4, 1]
    assert rows[1]["weight_shape"] == [4, 1, 3, 3]
    assert [r["needs_input_grad"] for r in rows] == [False, True, True]


def test_nested_paths_and_untouched_model():
    model = make_model("resnet").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = layer_table(model, torch.randn(4, *IN_SHAPE))
    assert rows[0]["weight"] == "conv1.weight" and rows[-1]["weight"] == "linear.weight"
    assert "layers.1.shortcut.0.weight" in {r["weight"] for r in rows}
    names = dict(model.named_parameters())
    assert all(r["weight"] in names for r in rows)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_activation_bytes_literal():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3))
    # input 1x4x4 = 16, conv 2x4x4 = 32, relu 32, pool 2x2x2 = 8, flatten (a view) 0, linear 3
    assert activation_bytes_per_sample(model, torch.randn(5, 1, 4, 4)) == 4 * (16 + 32 + 32 + 8 + 3)
    inplace = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(inplace=True))
    assert activation_bytes_per_sample(inplace, torch.randn(1, 1, 4, 4)) == 4 * (16 + 32)


@pytest.mark.parametrize("engine", ["portable", "ort-training"])
def test_manifest_holds_layer_table(exported, engine):
    model, folder = exported("cnn", engine)
    extra = load_manifest(folder).extra
    x = torch.randn(2, *IN_SHAPE)
    assert extra["layers"] == layer_table(model, x)
    assert extra["activation_bytes_per_sample"] == activation_bytes_per_sample(model, x) > 0
    assert "step_inputs" in extra or "param_graph_names" in extra  # the engine's own keys are kept


@pytest.mark.parametrize("shape", [(1, 7, 7), (1, 8, 8), (1, 11, 11), (3, 28, 28), (1, 28, 29)])
def test_cnn_s2_takes_odd_and_even_sizes(shape):
    from edgecl.exporters import build_model

    model = build_model("cnn-s2", shape, 10).eval()
    assert model(torch.zeros(2, *shape)).shape == (2, 10)


def test_cnn_s2_stem_is_a_small_share_of_the_forward_work_on_28x28():
    from edgecl.exporters import build_model

    shares = {}
    for name in ("cnn", "cnn-s2"):
        table = layer_table(build_model(name, (1, 28, 28), 10), torch.zeros(2, 1, 28, 28))
        shares[name] = table[0]["macs_per_sample"] / sum(row["macs_per_sample"] for row in table)
    assert shares["cnn"] == pytest.approx(0.101, abs=0.002) and shares["cnn-s2"] == pytest.approx(0.0275, abs=0.002)
