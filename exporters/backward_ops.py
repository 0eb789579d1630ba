"""Decompositions and ONNX translations of the backward ops of the portable step graph.

`make_fx` with `core_aten_decompositions()` leaves `aten.convolution_backward`,
`aten.max_pool2d_with_indices_backward` and `aten.avg_pool2d_backward` whole; the ONNX
exporter cannot translate them. The convolution backward is rewritten in
`conv_grads` (formulations chosen per layer shape), the average-pool backward here, in ops
that it can translate (convolution, transposed convolution, products); max pooling gets
its own ONNX translation pair (`onnx_translations`). The ReLU / ReLU6 backwards are
replaced for speed only: on a (32, 16, 28, 28) tensor ONNX Runtime 1.19 takes 2.8 ms for
the core decomposition's LessOrEqual + Where, 0.65 ms for Greater + Cast + Mul.
"""

from __future__ import annotations

import torch
from torch._decomp import core_aten_decompositions

from . import conv_grads, graph_ops

aten = torch.ops.aten


def convolution_backward(grad_out, inp, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
                         groups, output_mask):
    """Gradients of a 2-D convolution, each by the formulation `conv_grads` picks from the static shapes.

    The input gradient is asked for only where the input needs one (not for the first layer);
    the bias gradient is a sum over batch and pixels.
    """
    if transposed:
        raise NotImplementedError("edgecl exports Conv2d, not ConvTranspose2d")
    in_hw = tuple(inp.shape[2:])
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        how = conv_grads.grad_input_formulation(weight.shape, stride, padding, dilation, groups)
        grad_input = conv_grads.grad_input(how, grad_out, in_hw, weight, stride, padding, dilation, groups)
    if output_mask[1]:
        how = conv_grads.grad_weight_formulation(in_hw, weight.shape, stride, padding, dilation, groups)
        grad_weight = conv_grads.grad_weight(how, grad_out, inp, weight.shape, stride, padding, dilation, groups)
    if output_mask[2]:
        grad_bias = grad_out.sum(dim=[0, 2, 3])
    return grad_input, grad_weight, grad_bias


def threshold_backward(grad_out, inp, threshold):
    """ReLU's backward as grad * (x > threshold): a Mul where the core decomposition has a Where.

    Same values as torch for finite inputs (torch: where(x <= threshold, 0, grad)); where
    the gradient is not finite at a blocked position this gives NaN, torch 0.
    """
    return grad_out * (inp > threshold).to(grad_out.dtype)


def hardtanh_backward(grad_out, inp, min_val, max_val):
    """ReLU6's backward as grad * (min < x < max) (torch: where(x <= min or x >= max, 0, grad))."""
    return grad_out * ((inp > min_val) & (inp < max_val)).to(grad_out.dtype)


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
    """core ATen decompositions plus the four above (max pooling is left to `onnx_translations`)."""
    table = dict(core_aten_decompositions())
    table[aten.avg_pool2d_backward.default] = avg_pool2d_backward
    table[aten.convolution_backward.default] = convolution_backward
    table[aten.threshold_backward.default] = threshold_backward
    table[aten.hardtanh_backward.default] = hardtanh_backward
    return table


def _pool_attributes(kernel_size, stride, padding, dilation):
    """torch's pooling arguments (ints or pairs, stride [] = kernel) as ONNX pairs."""
    def pair(v):
        return [int(v)] * 2 if isinstance(v, int) else [int(i) for i in v] * (2 // len(v))

    kernel = pair(kernel_size)
    return kernel, pair(stride) if stride else kernel, pair(padding), pair(dilation)


def max_pool2d_with_indices_onnx(self, kernel_size, stride=(), padding=(0, 0), dilation=(1, 1), ceil_mode=False):
    """ONNX translation of the forward: MaxPool with its indices kept as ONNX returns them.

    ONNX's indices are flat over N*C*H*W, torch's per (N, C) plane. The default translation
    converts them with a second, kernel-1 MaxPool over the whole input (as slow as the pool
    itself); the only reader here is the backward translation below (the exporter refuses
    return_indices=True), which wants them flat, so they stay flat.
    """
    from onnxscript import opset18 as op

    kernel, strides, pads, dilations = _pool_attributes(kernel_size, stride, padding, dilation)
    return op.MaxPool(self, kernel_shape=kernel, strides=strides, pads=pads * 2, dilations=dilations,
                      ceil_mode=int(ceil_mode))


def max_pool2d_with_indices_backward_onnx(grad_output, self, kernel_size, stride, padding, dilation, ceil_mode,
                                          indices):
    """ONNX translation of the backward: route each output gradient to its argmax (flat indices).

    Windows that cannot overlap (stride >= dilated kernel) write each input position at most
    once: MaxUnpool. Overlapping windows may pick one position twice: a flat scatter-add.
    """
    from onnxscript import opset18 as op

    kernel, strides, pads, dilations = _pool_attributes(kernel_size, stride, padding, dilation)
    shape = op.Shape(self)
    if all(s >= d * (k - 1) + 1 for k, s, d in zip(kernel, strides, dilations)):
        return op.MaxUnpool(grad_output, indices, shape, kernel_shape=kernel, strides=strides, pads=pads * 2)
    zeros = op.CastLike(op.ConstantOfShape(op.Reshape(op.Size(self), op.Constant(value_ints=[1]))), grad_output)
    flat = op.ScatterElements(zeros, op.Reshape(indices, op.Constant(value_ints=[-1])),
                              op.Reshape(grad_output, op.Constant(value_ints=[-1])), axis=0, reduction="add")
    return op.Reshape(flat, shape)


def onnx_translations() -> dict:
    """ATen op -> ONNX translation, for `torch.onnx.export(custom_translation_table=...)`."""
    return {
        aten.max_pool2d_with_indices.default: max_pool2d_with_indices_onnx,
        aten.max_pool2d_with_indices_backward.default: max_pool2d_with_indices_backward_onnx,
        **graph_ops.onnx_translations(),
    }
