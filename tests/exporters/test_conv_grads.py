"""Every convolution-gradient formulation the exporter can choose matches torch, alone and in the step graph."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgecl.exporters import conv_grads, export
from edgecl.exporters.graph_ops import window, zero_pad
from edgecl.exporters.reference import TorchEngine
from edgecl.runtime import OptimizerConfig, open_engine
from tests.helpers import rel_err

aten = torch.ops.aten


def _layers():
    """(cin, cout, groups, kernel, stride, padding, dilation, in_hw): every variant, odd sizes included."""
    out = []
    for (cin, cout, groups), kernel, stride, padding, dilation, in_hw in itertools.product(
            [(4, 6, 1), (4, 6, 2), (4, 4, 4), (3, 8, 1)], [(1, 1), (3, 3), (2, 3)], [(1, 1), (2, 2), (2, 1)],
            [(0, 0), (2, 1)], [(1, 1), (2, 2)], [(7, 8)]):
        if all(in_hw[i] + 2 * padding[i] >= dilation[i] * (kernel[i] - 1) + 1 for i in range(2)):
            out.append((cin, cout, groups, kernel, stride, padding, dilation, in_hw))
    return out


LAYERS = _layers()


@pytest.mark.parametrize("name", conv_grads.GRAD_INPUT + conv_grads.GRAD_WEIGHT)
def test_each_formulation_matches_torch_wherever_it_applies(name):
    torch.manual_seed(0)
    kind = "input" if name in conv_grads.GRAD_INPUT else "weight"
    applies = conv_grads.grad_input_applies if kind == "input" else conv_grads.grad_weight_applies
    checked = 0
    for cin, cout, groups, kernel, stride, padding, dilation, in_hw in LAYERS:
        w = torch.randn(cout, cin // groups, *kernel, dtype=torch.float64)
        if not applies(name, w.shape, stride, padding, dilation, groups):
            continue
        x = torch.randn(3, cin, *in_hw, dtype=torch.float64)
        g = torch.randn_like(torch.conv2d(x, w, None, stride, padding, dilation, groups))
        dx, dw, _ = aten.convolution_backward(g, x, w, None, stride, padding, dilation, False, [0, 0], groups,
                                              [True, True, False])
        if kind == "input":
            got, want = conv_grads.grad_input(name, g, in_hw, w, stride, padding, dilation, groups), dx
        else:
            got, want = conv_grads.grad_weight(name, g, x, w.shape, stride, padding, dilation, groups), dw
        assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-10, atol=1e-10), (
            name, cin, cout, groups, kernel, stride, padding, dilation, in_hw)
        checked += 1
    assert checked >= 20, checked  # every formulation meets strides, paddings and dilations


class _ConvVariants(nn.Module):
    """Stride 2 and (2, 1), padding, dilation, groups, depthwise at strides 1 and 2, a widening
    conv, pointwise, a padded 1x1 and a non-square kernel; with and without bias."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([
            nn.Conv2d(2, 8, 3, stride=2, padding=1),  # 9x9 -> 5x5, the stem: no input gradient
            nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, bias=False),
            nn.Conv2d(8, 8, 3, padding=1, groups=8),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False),  # -> 3x3
            nn.Conv2d(8, 12, 3, padding=1),
            nn.Conv2d(12, 6, 1, bias=False),
            nn.Conv2d(6, 6, 1, padding=1),  # -> 5x5
            nn.Conv2d(6, 4, (3, 2), stride=(2, 1), padding=(1, 0)),  # -> 3x4
        ])
        self.head = nn.Linear(4 * 3 * 4, 10)

    def forward(self, x):
        for i, conv in enumerate(self.convs):
            x = conv(x)
            x = torch.relu(x) if i % 2 else torch.nn.functional.relu6(x)
        return self.head(x.flatten(1))


SGD = OptimizerConfig("sgd", lr=0.05, momentum=0.9)
FORCED = [{"grad_input": n} for n in conv_grads.GRAD_INPUT] + [{"grad_weight": n} for n in conv_grads.GRAD_WEIGHT]


@pytest.mark.parametrize("force", FORCED, ids=lambda f: f"{next(iter(f))}={next(iter(f.values()))}")
def test_forced_formulation_trains_like_torch_on_the_portable_engine(tmp_path, force):
    torch.manual_seed(0)
    model = _ConvVariants()
    with conv_grads.forced(**force):
        export(model, torch.randn(4, 2, 9, 9), tmp_path / "a", engine="portable", masks="weights")
    eng = open_engine(tmp_path / "a", SGD)
    ref = TorchEngine.from_artifacts(model, tmp_path / "a", SGD)
    rng = np.random.default_rng(1)
    for _ in range(20):  # as every parity test: 20 optimizer steps
        x = rng.standard_normal((6, 2, 9, 9), dtype=np.float32)  # batch 6: the batch stays symbolic
        y = rng.integers(0, 10, 6)
        loss, grads = eng.loss_and_grads(x, y)
        ref_loss, ref_grads = ref.loss_and_grads(x, y)
        assert rel_err(loss, ref_loss) <= 1e-4
        assert grads.keys() == ref_grads.keys()
        for k in ref_grads:
            assert rel_err(grads[k], ref_grads[k]) <= 1e-4, k
        eng.apply_gradients(grads)
        ref.apply_gradients(ref_grads)
    ops = [n.op_type for n in onnx.load(tmp_path / "a" / "step.onnx").graph.node]
    if "grad_input" in force:  # 7 input gradients; "flipped" cannot do the two strided ones nor the padded 1x1
        assert ops.count("ConvTranspose") == {"transposed": 7, "flipped": 3}[force["grad_input"]]


def test_the_first_layer_gets_no_input_gradient(tmp_path):
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 10))
    with conv_grads.forced(grad_weight="shifted"):  # a weight gradient without any convolution
        export(model, torch.randn(4, 2, 5, 5), tmp_path / "a", engine="portable")
    ops = [n.op_type for n in onnx.load(tmp_path / "a" / "step.onnx").graph.node]
    assert ops.count("Conv") == 1 and "ConvTranspose" not in ops  # the forward convolution only


# (in_hw, weight shape, stride, padding, groups) -> (input gradient, weight gradient): the measured rule
RULE = [
    ((32, 32), (64, 64, 3, 3), 1, 1, 1, "flipped", "shifted_per_sample"),  # ResNet-18 stage 1
    ((16, 16), (128, 128, 3, 3), 1, 1, 1, "flipped", "shifted_per_sample"),
    ((8, 8), (256, 256, 3, 3), 1, 1, 1, "flipped", "shifted"),
    ((32, 32), (128, 64, 3, 3), 2, 1, 1, "transposed", "im2col_per_sample"),
    ((16, 16), (256, 128, 3, 3), 2, 1, 1, "transposed", "shifted"),
    ((32, 32), (128, 64, 1, 1), 2, 0, 1, "transposed", "shifted_per_sample"),  # shortcuts
    ((16, 16), (256, 128, 1, 1), 2, 0, 1, "transposed", "pointwise"),
    ((32, 32), (64, 3, 3, 3), 1, 1, 1, "transposed", "im2col_per_sample"),  # stem (has no input gradient)
    ((32, 32), (32, 1, 3, 3), 1, 1, 32, "flipped", "depthwise_rows"),
    ((32, 32), (64, 1, 3, 3), 2, 1, 64, "transposed", "grouped_conv"),
    ((16, 16), (128, 64, 1, 1), 1, 0, 1, "flipped", "shifted_per_sample"),
    ((8, 8), (64, 384, 1, 1), 1, 0, 1, "flipped", "pointwise"),
    ((8, 8), (64, 32, 1, 1), 1, 0, 2, "flipped", "pointwise"),  # grouped
    ((14, 14), (32, 16, 3, 3), 1, 1, 1, "transposed", "shifted_per_sample"),  # cnn-s2: a widening 3x3
]


@pytest.mark.parametrize("in_hw, shape, stride, padding, groups, want_input, want_weight", RULE)
def test_rule_picks_the_measured_fastest(in_hw, shape, stride, padding, groups, want_input, want_weight):
    s, p, d = [stride] * 2, [padding] * 2, [1, 1]
    assert conv_grads.grad_input_formulation(shape, s, p, d, groups) == want_input
    assert conv_grads.grad_weight_formulation(in_hw, shape, s, p, d, groups) == want_weight


def test_forced_applies_only_where_it_can_and_ends_with_the_block():
    s1, s2, p, d = [1, 1], [2, 2], [1, 1], [1, 1]
    with conv_grads.forced(grad_input="transposed", grad_weight="depthwise_rows"):
        assert conv_grads.grad_input_formulation((64, 64, 3, 3), s1, p, d, 1) == "transposed"
        assert conv_grads.grad_weight_formulation((8, 8), (64, 64, 3, 3), s1, p, d, 1) == "shifted"
        assert conv_grads.grad_weight_formulation((32, 32), (64, 1, 3, 3), s2, p, d, 64) == "depthwise_rows"
    assert conv_grads.grad_input_formulation((64, 64, 3, 3), s1, p, d, 1) == "flipped"
    with pytest.raises(ValueError, match=r"grad_weight='im2col'; accepted: pointwise, grouped_conv"):
        with conv_grads.forced(grad_weight="im2col"):
            pass
    with pytest.raises(ValueError, match=r"grad_input='polyphase'; accepted: transposed, flipped"):
        with conv_grads.forced(grad_input="polyphase"):
            pass


def test_zero_pad_and_window_match_their_torch_meaning():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6)
    want = torch.nn.functional.pad(x, (2, 0, 1, 3))
    assert torch.equal(zero_pad(x, [(1, 3), (2, 0)]), want)
    assert torch.equal(window(x, (1, 2), (2, 2), (2, 3)), x[:, :, 1:4:2, 2:6:3])
    assert torch.equal(window(x, [1], [3], [2], axes=[-1]), x[..., 1:6:2])
