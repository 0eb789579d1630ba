"""Average pools of the ort-training graph as depthwise convolutions with fixed weights.

onnxruntime-training 1.19.2's `AveragePoolGrad` kernel takes the shape of its output (the
pool's input gradient) from the graph's static shape information, where the dynamic batch
dimension is 0; unlike `MaxPoolGrad` it never puts the batch size of the incoming gradient
back. The gradient of any layer before an average pool is then an empty tensor, and the
`ConvGrad` that consumes it divides by its size: the process dies of SIGFPE.

An average pool is a depthwise convolution with all-ones weights followed by a division by
each window's element count, which ORT's Conv gradient (the one every convolution of the
model uses) handles at any batch size. The rewrite is exact up to float32 rounding (sum then
multiply by 1/count instead of sum then divide); the portable engine decomposes the pool's
backward the same way (`backward_ops`: a depthwise transposed convolution).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgecl.runtime.errors import UnsupportedModelError


def _window_counts(size: int, kernel: int, stride: int, pad_begin: int, out: int, include_pad: bool) -> np.ndarray:
    """Elements of each window along one axis (padding counted or not), as ONNX AveragePool divides."""
    if include_pad:
        return np.full(out, kernel, np.int64)
    start = np.arange(out) * stride - pad_begin
    return np.minimum(start + kernel, size) - np.maximum(start, 0)


def _static_shapes(proto: onnx.ModelProto) -> dict[str, list[int | None]]:
    inferred = onnx.shape_inference.infer_shapes(proto)
    graph = inferred.graph
    shapes = {}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


def average_pools_as_convolutions(proto: onnx.ModelProto) -> int:
    """Replace every 2-D AveragePool node of `proto` (in place) by Conv(ones, group=C) * (1 / count).

    Returns:
        How many pools were replaced.
    Raises:
        UnsupportedModelError: a pool with ceil_mode, auto_pad, dilations, or an input whose
            channels or spatial size are not static.
    """
    if not any(n.op_type == "AveragePool" for n in proto.graph.node):
        return 0
    shapes = _static_shapes(proto)
    nodes, replaced = [], 0
    for node in proto.graph.node:
        if node.op_type != "AveragePool" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        where = f"AveragePool {node.name or node.output[0]!r}"
        if attrs.get("ceil_mode", 0) or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") \
                or any(d != 1 for d in attrs.get("dilations", [1, 1])):
            raise UnsupportedModelError(f"{where}: ceil_mode, auto_pad or dilations; supported: none of them")
        shape = shapes.get(node.input[0])
        if shape is None or len(shape) != 4 or None in shape[1:]:
            raise UnsupportedModelError(f"{where}: input shape {shape}; supported: (N, C, H, W) with C, H, W static")
        _, channels, height, width = shape
        kh, kw = attrs["kernel_shape"]
        sh, sw = attrs.get("strides", [1, 1])
        top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
        out_h, out_w = (height + top + bottom - kh) // sh + 1, (width + left + right - kw) // sw + 1
        include_pad = bool(attrs.get("count_include_pad", 0))
        counts = np.outer(_window_counts(height, kh, sh, top, out_h, include_pad),
                          _window_counts(width, kw, sw, left, out_w, include_pad))
        prefix = f"{node.output[0]}::as_conv"
        ones = numpy_helper.from_array(np.ones((channels, 1, kh, kw), np.float32), f"{prefix}::weight")
        scale = numpy_helper.from_array((1.0 / counts).astype(np.float32).reshape(1, 1, out_h, out_w),
                                        f"{prefix}::inverse_count")
        nodes += [
            helper.make_node("Constant", [], [ones.name], value=ones, name=f"{prefix}::weight"),
            helper.make_node("Constant", [], [scale.name], value=scale, name=f"{prefix}::inverse_count"),
            helper.make_node("Conv", [node.input[0], ones.name], [f"{prefix}::sum"], name=f"{prefix}::conv",
                             group=channels, kernel_shape=[kh, kw], strides=[sh, sw],
                             pads=[top, left, bottom, right], dilations=[1, 1]),
            helper.make_node("Mul", [f"{prefix}::sum", scale.name], list(node.output), name=f"{prefix}::mean"),
        ]
        replaced += 1
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return replaced
