"""The channel-structured portable graphs: one step graph that trains any subset of output channels.

`export(..., structure="channel")` writes `step.onnx` and `forward.onnx` whose extra inputs
`channels::<set>` (int64, (k,), sorted, distinct, in [0, size)) name the active output channels
of each channel set (`channel_plan`). The graph gathers what it needs from the full tensors
(`Gather` of weight rows by the layer's own set, of columns by its input's set, BatchNorm
parameters and statistics by their set), so every activation after a pruned layer is k channels
wide and the convolutions run on narrower tensors. The gradients and new BatchNorm statistics
come back compact (`grad::<name>` of the gathered shape): the runtime scatters them into the full
arrays (`edgecl.runtime.channels`). Every channel count is a symbol of the trace, never a
constant, so one export runs any subset: the full sets give the dense graph's results.

Depthwise layers follow their input channels. ONNX's Conv takes its group count as an
attribute, fixed at export, so a depthwise layer of k channels runs here as one single-channel
Conv per (sample, channel) pair with k*k one-hot kernels (its taps) and a per-channel weighted
sum of the taps: about kh*kw times a depthwise Conv's multiply-adds, on a small share of the work.

Graph inputs:  as the portable graphs, then channels::<set>... in `ChannelPlan.sets` order.
Graph outputs: as the portable graphs, with the gradients and statistics of gathered tensors compact.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgecl.runtime.manifest import TensorSpec

from .channel_plan import ChannelPlan, Gather, is_depthwise, plan_channels
from .portable import BATCH_INPUTS, _export_graph, _training_copy, weighted_loss


class _DepthwiseAnyWidth(nn.Module):
    """A depthwise Conv2d whose channel count is whatever its input has (no group attribute):
    the input as N*C single-channel images, a Conv with the kh*kw one-hot kernels (the taps),
    then per channel the weighted sum of its taps. Same parameter names as the Conv2d."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"depthwise padding {conv.padding!r} ({conv.padding_mode}); accepted: zero padding by ints")

    def forward(self, x):
        n, c, h, w = x.shape
        kh, kw = self.weight.shape[2:]
        tap = torch.arange(kh * kw)  # (torch.eye exports as an Equal ONNX Runtime 1.19 has no kernel for)
        taps = (tap[:, None] == tap[None, :]).to(x.dtype).reshape(kh * kw, 1, kh, kw)
        cols = F.conv2d(x.reshape(n * c, 1, h, w), taps, None, self.stride, self.padding, self.dilation)
        ho, wo = cols.shape[2], cols.shape[3]
        y = (cols.reshape(n, c, kh * kw, ho * wo) * self.weight.reshape(1, c, kh * kw, 1)).sum(2)
        y = y.reshape(n, c, ho, wo)
        return y if self.bias is None else y + self.bias.reshape(1, c, 1, 1)


def _any_width_depthwise(model: nn.Module) -> nn.Module:
    """`model` (changed in place) with every depthwise Conv2d as `_DepthwiseAnyWidth`."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if is_depthwise(child):
                setattr(module, child_name, _DepthwiseAnyWidth(child))
    return model


def narrow(t: torch.Tensor, g: Gather | None, index: dict[str, torch.Tensor]) -> torch.Tensor:
    """The rows and columns of `t` that gather `g` keeps (in the trace: Gather nodes on the index inputs)."""
    if g is None:
        return t
    if g.rows is not None:
        t = t.index_select(0, index[g.rows])
    if g.cols is not None:
        cols = index[g.cols]
        if g.repeat > 1:  # each channel of a flattened (C, H, W) feature map is `repeat` columns
            cols = (cols[:, None] * g.repeat + torch.arange(g.repeat)[None, :]).reshape(-1)
        t = t.index_select(1, cols)
    return t


def _split(flat, names, mask_names, buffer_names, set_names):
    sizes = [len(names), len(mask_names), len(buffer_names), len(set_names)]
    bounds = np.cumsum([0, *sizes])
    parts = [flat[bounds[i] : bounds[i + 1]] for i in range(4)]
    return [dict(zip(keys, part)) for keys, part in zip((names, mask_names, buffer_names, set_names), parts)]


def _make_step_fn(model, bns, params, buffers, mask_names, plan: ChannelPlan, functional: bool):
    names = [p.name for p in params]
    trainable = [p.name for p in params if p.trainable]
    buffer_names = [b.name for b in buffers]
    set_names = list(plan.sets)
    bn_of_buffer = {b: (path, 0 if b.endswith("running_mean") else 1) for path in bns for b in buffer_names
                    if b.rsplit(".", 1)[0] == path}

    def forward(state, x):
        logits = torch.func.functional_call(model, state, (x,), strict=False)
        return logits, {path: bn.new_stats for path, bn in bns.items()}

    forward = torch.func.functionalize(forward) if functional else forward

    def step(x, y, sample_weight, target_logits, logit_weight, *flat):
        p_vals, m_vals, b_vals, index = _split(flat, names, mask_names, buffer_names, set_names)
        # the compact tensors are the leaves: their gradients come out compact
        compact = {n: narrow(p_vals[n], plan.gathers.get(n), index) for n in names}
        for n in trainable:
            compact[n].requires_grad_(True)
        effective = {n: (compact[n] * narrow(m_vals[n], plan.gathers.get(n), index) if n in m_vals else compact[n])
                     for n in names}
        stats_in = {b: narrow(v, plan.gathers.get(b), index) for b, v in b_vals.items()}
        logits, stats = forward({**effective, **stats_in}, x)
        loss = weighted_loss(logits, y, sample_weight, target_logits, logit_weight)
        grads = torch.autograd.grad(loss, [compact[n] for n in trainable])
        new_buffers = [stats[bn_of_buffer[b][0]][bn_of_buffer[b][1]] for b in buffer_names]
        return (loss, logits, *grads, *new_buffers)

    return step


def _make_forward_fn(model, params, buffers, mask_names, plan: ChannelPlan, functional: bool):
    names = [p.name for p in params]
    buffer_names = [b.name for b in buffers]
    set_names = list(plan.sets)

    def forward(x, *flat):
        p_vals, m_vals, b_vals, index = _split(flat, names, mask_names, buffer_names, set_names)
        state = {n: narrow(v, plan.gathers.get(n), index) for n, v in {**p_vals, **b_vals}.items()}
        for n in mask_names:
            state[n] = state[n] * narrow(m_vals[n], plan.gathers.get(n), index)
        return (torch.func.functional_call(model, state, (x,), strict=False),)

    return torch.func.functionalize(forward) if functional else forward


def example_lengths(plan: ChannelPlan, batch: int) -> dict[str, int]:
    """Index lengths for the trace: distinct, >= 2, none equal to the batch size (the trace makes
    one symbol of equal example sizes), each as close to its set's size as that allows."""
    taken, out = {batch}, {}
    for s, size in plan.sets.items():
        k = size
        while k in taken:
            k -= 1
        if k < 2:
            k = max(taken) + 1  # an index longer than its set is harmless for a trace with fake tensors
        taken.add(k)
        out[s] = k
    return out


def write_structured(model: nn.Module, example_input: torch.Tensor, folder: Path, params: tuple[TensorSpec, ...],
                     buffers: tuple[TensorSpec, ...], masks: dict[str, np.ndarray], opset: int, dropout: bool):
    """Write the channel-structured `step.onnx` and `forward.onnx` into `folder`.

    Returns:
        (file names written, manifest `extra`: the graphs' input and output names and `channels`,
        `ChannelPlan.to_dict()`).
    Raises:
        UnsupportedModelError: a model the channel structure cannot follow (`plan_channels`).
    """
    plan = plan_channels(model, example_input)
    mask_names = [p.name for p in params if p.masked]
    trainable = [p.name for p in params if p.trainable]
    named_params, named_buffers = dict(model.named_parameters()), dict(model.named_buffers())
    x = example_input[: max(2, min(4, len(example_input)))].clone()
    if len(x) < 2:
        x = torch.cat([x, x])
    n = len(x)
    with torch.no_grad():
        k = int(model.eval()(x).shape[1])
    model.train()
    p_args = [named_params[p.name].detach().clone() for p in params]
    m_args = [torch.from_numpy(masks[name]) for name in mask_names]
    b_args = [named_buffers[b.name].detach().clone() for b in buffers]
    i_args = [torch.arange(length, dtype=torch.int64) for length in example_lengths(plan, n).values()]
    channel_inputs = [f"channels::{s}" for s in plan.sets]
    state_inputs = ([f"param::{p.name}" for p in params] + [f"mask::{m}" for m in mask_names]
                    + [f"buffer::{b.name}" for b in buffers] + channel_inputs)

    train_model, bns = _training_copy(model, dropout)
    step_fn = functools.partial(_make_step_fn, _any_width_depthwise(train_model), bns, params, buffers, mask_names,
                                plan)
    batch_args = [x, torch.zeros(n, dtype=torch.int64), torch.full((n,), 1.0 / n), torch.zeros(n, k), torch.zeros(n)]
    step_inputs = list(BATCH_INPUTS) + state_inputs
    step_outputs = ["loss", "logits"] + [f"grad::{t}" for t in trainable] + [f"buffer_out::{b.name}" for b in buffers]
    args = batch_args + p_args + m_args + b_args + i_args
    first = len(args) - len(i_args)
    _export_graph(step_fn, args, len(BATCH_INPUTS), step_inputs, step_outputs, folder / "step.onnx", opset,
                  {first + i: f"k_{s}" for i, s in enumerate(plan.sets)})

    eval_model = _any_width_depthwise(copy.deepcopy(model).eval())
    forward_fn = functools.partial(_make_forward_fn, eval_model, params, buffers, mask_names, plan)
    forward_inputs = ["x"] + state_inputs
    args = [x] + p_args + m_args + b_args + i_args
    first = len(args) - len(i_args)
    _export_graph(forward_fn, args, 1, forward_inputs, ["logits"], folder / "forward.onnx", opset,
                  {first + i: f"k_{s}" for i, s in enumerate(plan.sets)})
    extra = {"step_inputs": step_inputs, "step_outputs": step_outputs, "forward_inputs": forward_inputs,
             "dropout": dropout, "channels": plan.to_dict()}
    return ["step.onnx", "forward.onnx"], extra
