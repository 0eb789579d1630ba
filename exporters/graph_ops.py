"""Two tensor ops for the backward formulations, each traced as one node and exported as one ONNX op.

`zero_pad`: `aten.constant_pad_nd` cannot be traced for the step graph, its fake
implementation turns the symbolic batch dimension into the example's size.
`window`: a strided window of the last two axes; as `aten.slice` twice it exports as two
ONNX Slice nodes, each a copy (ONNX has no views), the first one of the whole tensor.

Both are registered with torch on first use (`ops()`), not at import.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def ops():
    """Register `edgecl::zero_pad` and `edgecl::window`; return them as (zero_pad, window) overloads."""
    @torch.library.custom_op("edgecl::zero_pad", mutates_args=())
    def zero_pad(x: torch.Tensor, pads: list[int]) -> torch.Tensor:
        r = x.dim()
        return F.pad(x, [v for i in reversed(range(r)) for v in (pads[i], pads[r + i])])

    @zero_pad.register_fake
    def _(x, pads):
        r = x.dim()
        return x.new_empty([x.shape[i] + pads[i] + pads[r + i] for i in range(r)])

    @torch.library.custom_op("edgecl::window", mutates_args=())
    def window(x: torch.Tensor, axes: list[int], starts: list[int], sizes: list[int], steps: list[int]) -> torch.Tensor:
        index = [slice(None)] * x.dim()
        for a, s0, n, st in zip(axes, starts, sizes, steps):
            index[a] = slice(s0, s0 + st * (n - 1) + 1, st)
        return x[tuple(index)].clone()

    @window.register_fake
    def _(x, axes, starts, sizes, steps):
        shape = list(x.shape)
        for a, n in zip(axes, sizes):
            shape[a] = n
        return x.new_empty(shape)

    return torch.ops.edgecl.zero_pad.default, torch.ops.edgecl.window.default


def zero_pad(x: torch.Tensor, pads_per_axis) -> torch.Tensor:
    """x zero-padded by (begin, end) pairs for its trailing axes."""
    pairs = [(0, 0)] * (x.dim() - len(pads_per_axis)) + list(pads_per_axis)
    return ops()[0](x, [b for b, _ in pairs] + [e for _, e in pairs])


def window(x: torch.Tensor, starts, sizes, steps=None, axes=(-2, -1)) -> torch.Tensor:
    """x[..., start :: step][:size] along each of `axes` (default the last two), as one copy."""
    return ops()[1](x, list(axes), list(starts), list(sizes), list(steps or [1] * len(axes)))


def _zero_pad_onnx(x, pads):
    from onnxscript import opset18 as op

    return op.Pad(x, op.Constant(value_ints=list(pads)))


def _window_onnx(x, axes, starts, sizes, steps):
    from onnxscript import opset18 as op

    ends = [s + st * (n - 1) + 1 for s, n, st in zip(starts, sizes, steps)]
    return op.Slice(x, op.Constant(value_ints=list(starts)), op.Constant(value_ints=ends),
                    op.Constant(value_ints=list(axes)), op.Constant(value_ints=list(steps)))


def onnx_translations() -> dict:
    zero_pad_op, window_op = ops()
    return {zero_pad_op: _zero_pad_onnx, window_op: _window_onnx}
