"""BatchNorm2d in training mode for the portable step graph: fused forward, closed-form backward.

Forward: one ONNX `BatchNormalization` in training mode (momentum 0) gives the output and
the batch mean and (biased) variance in one kernel. ONNX Runtime's CPU kernel compiles its
training mode out only in minimal builds, which read .ort files, not .onnx: every build
that runs these graphs (1.19.2 and 1.32 here, x86-64 and aarch64 wheels) has it.
Backward, with M = N*H*W elements per channel, x^ = (x - mean) * invstd, a = gamma * invstd:

    dbeta  = sum(dy)        dgamma = sum(dy * x^) = invstd * (sum(dy * x) - mean * sum(dy))
    dx     = a * (dy - sum(dy) / M - x^ * sum(dy * x^) / M)
           = BatchNormalization(x; scale = -a * invstd * dgamma / M, bias = -a * dbeta / M,
                                mean = mean, var = 1, eps = 0) + a * dy

(Ioffe & Szegedy 2015, section 3): two reductions and three full-size ops per layer where
autograd's derivative of the normalisation written in element-wise ops gave ~40 nodes.

Measured with ONNX Runtime 1.19.2 (2 threads, batch 32, 3x32x32, the two graphs' runs
interleaved, load average 3.5): the ResNet-18 step's kernels other than convolutions and
transposes took 240 ms per step against 464 ms with the element-wise formulation (2308
graph nodes against 3166), the MobileNet step 370 ms against 494 ms. ONNX Runtime's
BatchNormalization kernel runs on one thread, so with more threads the gap narrows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

aten = torch.ops.aten


def _channels(v: Tensor) -> Tensor:
    """A per-channel vector (C,) as (1, C, 1, 1), to broadcast over NCHW."""
    return v[None, :, None, None]


@torch.library.custom_op("edgecl::batch_norm_train", mutates_args=())
def batch_norm_train(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                     eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(normalised x, batch mean, biased batch variance) over dims 0, 2, 3 of an NCHW x."""
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    y = (x - _channels(mean)) * _channels(torch.rsqrt(var + eps))
    if weight is not None:
        y = y * _channels(weight)
    if bias is not None:
        y = y + _channels(bias)
    return y, mean, var


@batch_norm_train.register_fake
def _(x, weight, bias, eps):
    c = x.shape[1]
    return torch.empty_like(x), x.new_empty(c), x.new_empty(c)


def batch_norm_train_onnx(x, weight, bias, eps: float):
    """ONNX translation: BatchNormalization in training mode with momentum 0, so its "running"
    outputs are the batch statistics (ones / zeros stand in for absent affine parameters)."""
    from onnxscript import opset18 as op

    # static: ONNX Runtime folds the constants below; symbolic in the structured graph (channel sets)
    c = x.shape[1]
    channels = op.Constant(value_ints=[c]) if isinstance(c, int) else op.Shape(x, start=1, end=2)

    def full(value):
        return op.CastLike(op.Expand(op.Constant(value_float=value), channels), x)

    # The input statistics' values do not matter (momentum 0), but ONNX Runtime may write the two
    # "running" outputs into the buffers of inputs 3 and 4 before it reads the scale and bias: all
    # four must be different tensors, so the statistics get values no other input has (with one
    # tensor of zeros for both, the mean came out as the variance).
    scale, shift = full(1.0) if weight is None else weight, full(0.0) if bias is None else bias
    y, mean, var = op.BatchNormalization(x, scale, shift, full(2.0), full(3.0), epsilon=eps, momentum=0.0,
                                         training_mode=1)
    return y, mean, var


def onnx_translations() -> dict:
    """The custom op -> its ONNX translation, for `fx_onnx.onnx_registry`."""
    return {torch.ops.edgecl.batch_norm_train.default: batch_norm_train_onnx}


class _BatchNormFunction(torch.autograd.Function):
    """Training-mode batch normalisation whose backward is the closed form above."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, var = batch_norm_train(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _mean_grad, _var_grad):
        x, weight, mean, var = ctx.saved_tensors
        count = x.shape[0] * x.shape[2] * x.shape[3]
        invstd = torch.rsqrt(var + ctx.eps)
        dbeta = dy.sum(dim=(0, 2, 3))
        dgamma = invstd * ((dy * x).sum(dim=(0, 2, 3)) - mean * dbeta)
        a = invstd if weight is None else weight * invstd
        scale, shift = -a * invstd * dgamma / count, -a * dbeta / count
        ones = torch.ones(var.shape[0], dtype=var.dtype)  # a constant (ones_like: an Expand at every step)
        centred = aten._native_batch_norm_legit_no_training(x, scale, shift, mean, ones, 0.0, 0.0)[0]
        dx = centred + dy * _channels(a)
        return dx, (dgamma if weight is not None and ctx.needs_input_grad[1] else None), \
            (dbeta if ctx.needs_input_grad[2] else None), None


class TrainBatchNorm2d(nn.Module):
    """BatchNorm2d in training mode written without in-place updates.

    Normalises with the batch statistics (as torch does in training) and leaves the new
    running statistics (torch's update: unbiased batch variance) in `self.new_stats`
    instead of mutating buffers, so the step graph can return them as outputs. Same
    parameter and buffer names as BatchNorm2d.
    """

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.weight, self.bias = bn.weight, bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.eps, self.momentum = bn.eps, bn.momentum
        self.new_stats = None

    def forward(self, x):
        y, mean, var = _BatchNormFunction.apply(x, self.weight, self.bias, self.eps)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        m = self.momentum
        unbiased = var * (count / max(count - 1, 1))
        self.new_stats = ((1 - m) * self.running_mean + m * mean, (1 - m) * self.running_var + m * unbiased)
        return y
