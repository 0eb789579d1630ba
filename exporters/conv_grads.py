"""The input and weight gradients of a 2-D convolution in the portable step graph, chosen per layer shape.

`convolution_backward` (backward_ops) asks `grad_input_formulation` / `grad_weight_formulation`
for a formulation from the layer's static shapes, then calls it. Each formulation is written in
ops the dynamo ONNX exporter translates (convolution, transposed convolution, matrix products)
plus the two single-node ops of `graph_ops` (zero padding, strided windows).

The rule comes from timing each formulation on ONNX Runtime 1.19.2 (2 threads, batch 32), the
candidates interleaved call by call with torch eager, per layer of ResNet-18 (CIFAR), MobileNet
(v1 and v2 shapes) and cnn-s2; milliseconds, medians of 11, load average 1.8-3.0 (mine included):

    input gradient           ConvTranspose  flipped Conv   torch
    3x3 64->64 32x32              31.7          28.6        23.3
    3x3 128->128 16x16            35.0          29.7        21.1
    3x3 256->256 8x8              30.4          24.5        15.1
    3x3 512->512 4x4              43.2          32.5        14.6
    3x3 16->32 14x14 (cnn-s2)      1.5           1.8         1.0   (it unfolds the wider gradient)
    depthwise 3x3 32ch 32x32       9.8           5.2         2.8
    1x1 128->128 16x16             3.1           2.2         2.9
    at stride 2 the alternatives lost under load 3.7 (64->128 32x32: ConvTranspose 13.5, four
    sub-kernel Convs interleaved 21.8, one Conv of the zero-dilated gradient 73.5).

    weight gradient        grouped Conv  shifted  shifted/sample  im2col/sample  torch
    3x3 64->64 32x32           111.5       65.0        48.6           55.3        26.5
    3x3 128->128 16x16          80.0       51.6        48.1           50.4        25.0
    3x3 256->256 8x8            53.9       27.7        46.4           58.4        19.8
    3x3 512->512 4x4            47.4       36.9       147.4          102.2        23.8
    3x3 s2 64->128 32x32        46.2       38.4        39.3           27.1        18.8
    3x3 s2 256->512 8x8         38.8       24.0        90.5           67.1        19.9
    3x3 3->64 32x32 (stem)       5.8       10.5         6.5            2.4         4.5
    3x3 16->32 14x14 (cnn-s2)    3.5        2.2         2.0            2.7         4.6
    1x1 128->128 16x16         (pointwise 7.9)  4.3     3.4            4.7         5.8
    1x1 s2 256->512 8x8        (pointwise 2.9)  2.5     6.4            6.5         1.9

    depthwise weight gradient  grouped Conv  shifted  row products  torch
    3x3 32ch 32x32                 26.6        12.7        9.3        2.4
    3x3 128ch 16x16                18.7         9.7        7.3        1.2
    3x3 960ch 4x4                  11.3        16.9       11.6        1.2
    3x3 s2 192ch 16x16              8.3        14.0       12.1        1.7

Under load 3.5-5 the same ranking held, except that im2col by a channel-major one-hot Conv
and per-tap products of windows with the gradient (depthwise) never won.
"""

from __future__ import annotations

import contextlib

import torch

from .graph_ops import window, zero_pad

aten = torch.ops.aten

GRAD_INPUT = ("transposed", "flipped")
GRAD_WEIGHT = ("pointwise", "grouped_conv", "shifted", "shifted_per_sample", "im2col_per_sample", "depthwise_rows")
_forced: dict[str, str] = {}


@contextlib.contextmanager
def forced(grad_input: str | None = None, grad_weight: str | None = None):
    """Within the block, use these formulations wherever they apply (tests of each formulation).

    Raises:
        ValueError: a name that is not one of GRAD_INPUT / GRAD_WEIGHT.
    """
    if grad_input is not None and grad_input not in GRAD_INPUT:
        raise ValueError(f"grad_input={grad_input!r}; accepted: {', '.join(GRAD_INPUT)}")
    if grad_weight is not None and grad_weight not in GRAD_WEIGHT:
        raise ValueError(f"grad_weight={grad_weight!r}; accepted: {', '.join(GRAD_WEIGHT)}")
    before = dict(_forced)
    _forced.update({k: v for k, v in (("input", grad_input), ("weight", grad_weight)) if v is not None})
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(before)


def static_channels(cin) -> bool:
    """A channel count fixed at export. In the channel-structured graph (`structured`) channel
    counts are symbols, and a formulation whose Conv has one group per input channel cannot run
    there: ONNX takes the group count as an attribute."""
    return isinstance(cin, int)


def _is_depthwise(weight_shape, groups) -> bool:
    return groups > 1 and weight_shape[1] == 1 and weight_shape[0] == groups


def grad_input_applies(name, weight_shape, stride, padding, dilation, groups) -> bool:
    if name == "flipped":  # a stride-1 Conv with padding d*(k-1) - p, which must not be negative
        return all(s == 1 and d * (k - 1) >= p for s, p, d, k in zip(stride, padding, dilation, weight_shape[2:]))
    return name == "transposed"


def grad_input_formulation(weight_shape, stride, padding, dilation, groups) -> str:
    """The input gradient's formulation: at stride 1 the flipped Conv, else ConvTranspose.

    Except for a k x k kernel with more output than input channels: the flipped Conv unfolds
    the output gradient (Cout * k*k rows per pixel), ConvTranspose's column buffer has Cin * k*k
    rows, so with Cout > Cin the Conv moves more memory (cnn-s2's 16->32 layer, 1.7 vs 1.4 ms).
    Extra memory of "flipped": one flipped, transposed copy of the weight.
    """
    cout, cin_g, kh, kw = weight_shape
    wide = kh * kw > 1 and cout > cin_g * groups
    if _forced.get("input") and grad_input_applies(_forced["input"], weight_shape, stride, padding, dilation, groups):
        return _forced["input"]
    if not wide and grad_input_applies("flipped", weight_shape, stride, padding, dilation, groups):
        return "flipped"
    return "transposed"


def grad_weight_applies(name, weight_shape, stride, padding, dilation, groups) -> bool:
    kh, kw = weight_shape[2:]
    if name == "pointwise":
        return kh == kw == 1 and not any(padding)
    if name == "depthwise_rows":
        return _is_depthwise(weight_shape, groups)
    if name == "im2col_per_sample":
        return groups == 1 and static_channels(weight_shape[1])
    if name == "shifted_per_sample":
        return groups == 1
    return name in ("grouped_conv", "shifted")


def grad_weight_formulation(in_hw, weight_shape, stride, padding, dilation, groups) -> str:
    """The weight gradient's formulation for this layer (measurements in the module docstring).

    Depthwise: row products at stride 1, the grouped Conv at stride 2 (nothing measured beat it
    by more than noise). Dense layers, by their output pixels P = Ho*Wo: with P >= 196 one
    product per sample summed over the batch (no transposes of the activations), of k*k shifted
    windows at stride 1, of an im2col by a one-hot depthwise Conv at stride 2 or with at most 32
    weights per output channel (stems: 3x3 over 1-3 channels); with fewer pixels the per-sample
    partial sums (N*Cout*Cin per tap) cost more than the products, and the windows go
    channel-major, one (Cout x N*P) @ (N*P x Cin) product each. 1x1 kernels below 196 pixels and
    grouped ones: one matrix product ("pointwise").

    Extra memory beyond the gradients themselves, x the layer's input and g its output gradient:
    shifted 2|x| + |g| + one window; shifted_per_sample |x| + one window + N*Cout*Cin sums;
    im2col_per_sample k*k |x| at output resolution + N*Cout*Cin*k*k sums; depthwise_rows 2|x| + |g|
    + C*kw*rows*Ho sums; grouped_conv (before this rule, for every k x k layer) |x| + |g| + ORT's
    N*Ho*Wo*k*k column buffer.
    """
    cout, cin_g, kh, kw = weight_shape
    ho, wo = (_out_len(in_hw[i], weight_shape[2 + i], stride[i], padding[i], dilation[i]) for i in range(2))
    if _forced.get("weight") and grad_weight_applies(_forced["weight"], weight_shape, stride, padding, dilation, groups):
        return _forced["weight"]
    dense, many_pixels = groups == 1, ho * wo >= 196
    if kh == kw == 1 and not any(padding):
        return "shifted_per_sample" if dense and many_pixels else "pointwise"
    if _is_depthwise(weight_shape, groups):
        return "depthwise_rows" if tuple(stride) == (1, 1) else "grouped_conv"
    if dense and static_channels(cin_g) and (cin_g * kh * kw <= 32 or (many_pixels and tuple(stride) != (1, 1))):
        return "im2col_per_sample"
    if dense and many_pixels:
        return "shifted_per_sample"
    return "shifted"


def _out_len(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


# ---------------------------------------------------------------- input gradient

def grad_input(name, grad_out, in_hw, weight, stride, padding, dilation, groups):
    """dL/dx (N, Cin, H, W) of a convolution, by formulation `name`."""
    if name == "flipped":
        return _grad_input_flipped(grad_out, weight, padding, dilation, groups)
    kernel = weight.shape[2:]
    extra = [in_hw[i] - ((grad_out.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + 1)
             for i in range(2)]
    return aten.convolution(grad_out, weight, None, stride, padding, dilation, True, extra, groups)


def _grad_input_flipped(grad_out, weight, padding, dilation, groups):
    """Stride 1: a Conv of the output gradient with the flipped, transposed kernel, padding d*(k-1) - p."""
    cout, cin_g, kh, kw = weight.shape
    if groups == 1:
        wt = weight.transpose(0, 1)
    else:  # (Cout, Cin/G, k, k) -> (Cin, Cout/G, k, k), group by group
        wt = weight.reshape(groups, cout // groups, cin_g, kh, kw).transpose(1, 2).reshape(cin_g * groups,
                                                                                         cout // groups, kh, kw)
    # flipping both spatial axes reverses the k*k taps: a product with the reversed identity, 3.5x faster
    # on ONNX Runtime than flip's negative-step Slice ([512, 512, 3, 3]: 7 against 25 ms, load 3.5)
    taps = torch.arange(kh * kw)
    reverse = (taps[:, None] + taps[None, :] == kh * kw - 1).to(weight.dtype)
    flipped = torch.matmul(wt.reshape(wt.shape[0], wt.shape[1], kh * kw), reverse).reshape(wt.shape)
    pads = [d * (k - 1) - p for k, p, d in zip((kh, kw), padding, dilation)]
    return aten.convolution(grad_out, flipped, None, [1, 1], pads, dilation, False, [0, 0], groups)


# ---------------------------------------------------------------- weight gradient

def grad_weight(name, grad_out, inp, weight_shape, stride, padding, dilation, groups):
    """dL/dW (Cout, Cin/G, kh, kw) of a convolution, by formulation `name`."""
    return _GRAD_WEIGHT[name](grad_out, inp, weight_shape, stride, padding, dilation, groups)


def _grad_weight_pointwise(grad_out, inp, weight_shape, stride, padding, dilation, groups):
    """1x1: dW[o, c] = sum over n, p of grad[n, o, p] * x[n, c, p], one matrix product (per group).

    As a grouped convolution this is a matrix-vector product per input channel (the "kernel"
    is the whole output gradient, the output one pixel); as one product, with no more
    memory, the MobileNet step ran 7-18 % faster (8x8 and 28x28 inputs).
    """
    cout, cin_g, _, _ = weight_shape
    ho, wo = grad_out.shape[2], grad_out.shape[3]
    g, cout_g = groups, cout // groups
    x = inp.permute(1, 0, 2, 3)[:, :, : stride[0] * (ho - 1) + 1 : stride[0], : stride[1] * (wo - 1) + 1 : stride[1]]
    x = x.reshape(g, cin_g, -1)  # (G, Cin/G, N * Ho * Wo)
    go = grad_out.permute(1, 0, 2, 3).reshape(g, cout_g, -1)  # (G, Cout/G, N * Ho * Wo)
    if cout_g == 1:  # one output channel per group: a product and a sum, not G one-row matrix products
        return (x * go).sum(dim=2).reshape(cout, cin_g, 1, 1)
    return torch.bmm(go, x.transpose(1, 2)).reshape(cout, cin_g, 1, 1)


def _grad_weight_grouped_conv(grad_out, inp, weight_shape, stride, padding, dilation, groups):
    """A grouped convolution of the (channel <-> batch transposed) input with the transposed output
    gradient, stride and dilation swapping roles, cropped to the kernel."""
    n, cin, h, w = inp.shape
    cout, _, kh, kw = weight_shape
    ho, wo = grad_out.shape[2], grad_out.shape[3]
    g = groups
    inp_t = inp.reshape(n, g, cin // g, h, w).permute(2, 1, 0, 3, 4).reshape(cin // g, g * n, h, w)
    grad_t = grad_out.reshape(n, g, cout // g, ho, wo).permute(1, 2, 0, 3, 4).reshape(cout, n, ho, wo)
    full = aten.convolution(inp_t, grad_t, None, dilation, padding, stride, False, [0, 0], g)
    return full[:, :, :kh, :kw].permute(1, 0, 2, 3)


def _pad_hw(x, padding):
    ph, pw = padding
    return zero_pad(x, [(ph, ph), (pw, pw)]) if ph or pw else x


def _taps(padded, kh, kw, ho, wo, stride, dilation):
    """The k*k shifted, strided (Ho, Wo) windows of a padded tensor (spatial axes last), one at a time."""
    if (kh, kw, *stride) == (1, 1, 1, 1) and tuple(padded.shape[-2:]) == (ho, wo):
        yield padded  # the whole tensor: no copy
        return
    for i in range(kh):
        for j in range(kw):
            yield window(padded, (dilation[0] * i, dilation[1] * j), (ho, wo), stride)


def _grad_weight_shifted(grad_out, inp, weight_shape, stride, padding, dilation, groups):
    """Channel-major: per kernel tap one (Cout/G x N*P) @ (N*P x Cin/G) product of the output
    gradient with that tap's window of the padded input; memory: one window at a time."""
    cin = inp.shape[1]
    cout, cin_g, kh, kw = weight_shape
    ho, wo = grad_out.shape[2], grad_out.shape[3]
    g = groups
    xp = _pad_hw(inp.transpose(0, 1), padding)  # (Cin, N, H + 2p, W + 2p)
    taps = []
    if g == 1:
        go = grad_out.transpose(0, 1).reshape(cout, -1)  # (Cout, N*P)
        for v in _taps(xp, kh, kw, ho, wo, stride, dilation):
            taps.append(torch.mm(go, v.reshape(cin, -1).t()))
    else:
        go = grad_out.transpose(0, 1).reshape(g, cout // g, -1)  # (G, Cout/G, N*P)
        for v in _taps(xp, kh, kw, ho, wo, stride, dilation):
            taps.append(torch.bmm(go, v.reshape(g, cin_g, -1).transpose(1, 2)))
    return torch.stack(taps, dim=-1).reshape(cout, cin_g, kh, kw)


def _grad_weight_shifted_per_sample(grad_out, inp, weight_shape, stride, padding, dilation, groups):
    """Per tap, (Cout x P) @ (P x Cin) per sample, summed over the batch: no transposes of the
    activations (groups 1), but N * Cout * Cin partial sums per tap: for large images."""
    n, cin = inp.shape[0], inp.shape[1]
    cout, cin_g, kh, kw = weight_shape
    ho, wo = grad_out.shape[2], grad_out.shape[3]
    go = grad_out.reshape(n, cout, -1)
    taps = [torch.bmm(go, v.reshape(n, cin, -1).transpose(1, 2)).sum(0)
            for v in _taps(_pad_hw(inp, padding), kh, kw, ho, wo, stride, dilation)]
    return torch.stack(taps, dim=-1).reshape(cout, cin_g, kh, kw)


def _grad_weight_im2col_per_sample(grad_out, inp, weight_shape, stride, padding, dilation, groups):
    """Unfold the input by a depthwise Conv with one-hot kernels (Cin*k*k channels), then one
    (Cout x P) @ (P x Cin*k*k) product per sample, summed: for layers with few input channels."""
    n, cin = inp.shape[0], inp.shape[1]
    cout, cin_g, kh, kw = weight_shape
    taps = torch.arange(kh * kw)
    one_hot = (taps[:, None] == taps[None, :]).to(inp.dtype).reshape(kh * kw, 1, kh, kw).repeat(cin, 1, 1, 1)
    cols = aten.convolution(inp, one_hot, None, stride, padding, dilation, False, [0, 0], cin)  # (N, Cin*kk, Ho, Wo)
    out = torch.bmm(grad_out.reshape(n, cout, -1), cols.reshape(n, cin * kh * kw, -1).transpose(1, 2)).sum(0)
    return out.reshape(cout, cin_g, kh, kw)


def _grad_weight_depthwise_rows(grad_out, inp, weight_shape, stride, padding, dilation, groups):
    """Depthwise: for each kernel column j, the products U_j[c] = X_j[c] (rows x N*Wo) @ G[c]^T
    (N*Wo x Ho) of every input row with every output-gradient row, batched over channels; the
    weight gradient sums U_j[c] along the diagonals r = s*h + d*i (a product with a 0/1 band).

    The elementwise alternatives (k*k windows times the gradient, summed) move k*k times the
    activations through memory; this does rows/k times the multiply-adds in large products.
    """
    n = inp.shape[0]
    c, _, kh, kw = weight_shape
    ho, wo = grad_out.shape[2], grad_out.shape[3]
    (sh, sw), (dh, dw) = stride, dilation
    rows = sh * (ho - 1) + dh * (kh - 1) + 1
    xp = _pad_hw(inp, padding)[:, :, :rows].permute(1, 2, 0, 3)  # (C, rows, N, Wp)
    go = grad_out.permute(1, 2, 0, 3).reshape(c, ho, -1)  # (C, Ho, N*Wo): the last axis stays innermost
    us = [torch.bmm(window(xp, [dw * j], [wo], [sw], axes=[-1]).reshape(c, rows, -1), go.transpose(1, 2))
          for j in range(kw)]
    u = torch.stack(us, dim=1).reshape(c * kw, rows * ho)
    r = torch.arange(rows).reshape(rows, 1, 1)
    h = torch.arange(ho).reshape(1, ho, 1)
    i = torch.arange(kh).reshape(1, 1, kh)
    band = (r == sh * h + dh * i).to(u.dtype).reshape(rows * ho, kh)
    return torch.mm(u, band).reshape(c, kw, kh).transpose(1, 2).reshape(c, 1, kh, kw)


_GRAD_WEIGHT = {"pointwise": _grad_weight_pointwise, "grouped_conv": _grad_weight_grouped_conv,
                "shifted": _grad_weight_shifted, "shifted_per_sample": _grad_weight_shifted_per_sample,
                "im2col_per_sample": _grad_weight_im2col_per_sample, "depthwise_rows": _grad_weight_depthwise_rows}
