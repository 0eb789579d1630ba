"""Decompositions of the backward ops that have no standard-ONNX translation.

`make_fx` with `core_aten_decompositions()` leaves `aten.convolution_backward`,
`aten.max_pool2d_with_indices_backward` and `aten.avg_pool2d_backward` whole; the ONNX
exporter cannot translate them. They are rewritten here in forward ops that it can
(convolution, transposed convolution, scatter-add).
"""

from __future__ import annotations

import torch
from torch._decomp import core_aten_decompositions

aten = torch.ops.aten


def convolution_backward(grad_out, inp, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
                         groups, output_mask):
    """Gradients of a 2-D convolution as convolutions.

    grad-input is the transposed convolution of the output gradient with the weight;
    grad-weight is a grouped convolution of the (channel <-> batch transposed) input with
    the transposed output gradient, where stride and dilation swap roles, cropped to the
    kernel; grad-bias is a sum.
    """
    if transposed:
        raise NotImplementedError("edgecl exports Conv2d, not ConvTranspose2d")
    n, cin, h, w = inp.shape
    cout, _, kh, kw = weight.shape
    ho, wo = grad_out.shape[2], grad_out.shape[3]
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        extra = _transposed_extra(inp, grad_out, (kh, kw), stride, padding, dilation)
        grad_input = aten.convolution(grad_out, weight, None, stride, padding, dilation, True, extra, groups)
    if output_mask[1]:
        g = groups
        inp_t = inp.reshape(n, g, cin // g, h, w).permute(2, 1, 0, 3, 4).reshape(cin // g, g * n, h, w)
        grad_t = grad_out.reshape(n, g, cout // g, ho, wo).permute(1, 2, 0, 3, 4).reshape(cout, n, ho, wo)
        full = aten.convolution(inp_t, grad_t, None, dilation, padding, stride, False, [0, 0], g)
        grad_weight = full[:, :, :kh, :kw].permute(1, 0, 2, 3)
    if output_mask[2]:
        grad_bias = grad_out.sum(dim=[0, 2, 3])
    return grad_input, grad_weight, grad_bias


def max_pool2d_with_indices_backward(grad_out, inp, kernel_size, stride, padding, dilation, ceil_mode, indices):
    """Scatter-add of the output gradient at the argmax positions (indices are per plane)."""
    n, c = inp.shape[0], inp.shape[1]
    flat = torch.zeros(n, c, inp.shape[2] * inp.shape[3], dtype=grad_out.dtype, device=grad_out.device)
    flat = flat.scatter_add(2, indices.reshape(n, c, -1), grad_out.reshape(n, c, -1))
    return flat.reshape(inp.shape)


def _transposed_extra(inp, grad_out, kernel, stride, padding, dilation=(1, 1)):
    """output_padding that makes a transposed convolution give back the input's size."""
    return [inp.shape[2 + i] - ((grad_out.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + 1)
            for i in range(2)]


def avg_pool2d_backward(grad_out, inp, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """Spread each output gradient evenly over its window: a depthwise transposed conv with ones."""
    if ceil_mode:
        raise NotImplementedError("AvgPool2d(ceil_mode=True) is not supported")
    kernel = list(kernel_size) * (2 // len(kernel_size))
    stride = list(stride or kernel) * (2 // len(stride or kernel))
    padding = list(padding) * (2 // len(padding))
    c = inp.shape[1]
    if divisor_override:
        grad = grad_out / divisor_override
    elif count_include_pad:
        grad = grad_out / (kernel[0] * kernel[1])
    else:  # divide by the number of real (non-padding) inputs in each window
        ones = torch.ones(1, 1, inp.shape[2], inp.shape[3], dtype=grad_out.dtype)
        count = aten.convolution(ones, torch.ones(1, 1, *kernel, dtype=grad_out.dtype), None, stride, padding,
                                 [1, 1], False, [0, 0], 1)
        grad = grad_out / count
    weight = torch.ones(c, 1, *kernel, dtype=grad_out.dtype)
    extra = _transposed_extra(inp, grad_out, kernel, stride, padding)
    return aten.convolution(grad, weight, None, stride, padding, [1, 1], True, extra, c)


def decomposition_table() -> dict:
    """core ATen decompositions plus the three above."""
    table = dict(core_aten_decompositions())
    table[aten.avg_pool2d_backward.default] = avg_pool2d_backward
    table[aten.convolution_backward.default] = convolution_backward
    table[aten.max_pool2d_with_indices_backward.default] = max_pool2d_with_indices_backward
    return table
