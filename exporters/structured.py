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
attribute, fixed at export, so a depthwise layer runs at full width: its k active input channels
are put back among all C (zeros elsewhere, one Gather), the grouped Conv runs, and its k active
outputs are gathered again; it saves no time. (The alternative with no group count, the input as
N*k single-channel images through a Conv with the kh*kw one-hot taps, then a weighted sum of the
taps per channel, saved more at density 0.25 but cost 2.2x the dense MobileNet step at density 1,
against 1.3x: MobileNet width 32, 3x32x32, batch 32, 2 threads, load average 1.9-2.2.)

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
from .portable import BATCH_INPUTS, _export_graph, _training_copy, trace_inputs, weighted_loss


class _DepthwiseFullWidth(nn.Module):
    """A depthwise Conv2d over a compact input: the k active channels placed back among all C
    (zeros elsewhere), the grouped Conv at full width, the k active outputs taken again.
    `positions` (C,): 1 + the place of each channel in the active index, 0 where inactive."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.index = self.positions = None  # set by the step function for each trace

    def forward(self, x):
        n, _, h, w = x.shape
        if self.index is None:  # the set stays full
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        wide = torch.cat([x.new_zeros(n, 1, h, w), x], 1).index_select(1, self.positions)
        kernel = torch.cat([self.weight.new_zeros(1, *self.weight.shape[1:]), self.weight], 0).index_select(
            0, self.positions)
        y = F.conv2d(wide, kernel, None, self.stride, self.padding, self.dilation, self.groups).index_select(1, self.index)
        return y if self.bias is None else y + self.bias.reshape(1, -1, 1, 1)


def _full_width_depthwise(model: nn.Module) -> dict[str, _DepthwiseFullWidth]:
    """`model` (changed in place) with every depthwise Conv2d as `_DepthwiseFullWidth`; returns them by path."""
    out = {}
    for path, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{path}.{child_name}" if path else child_name
            if is_depthwise(child):
                setattr(module, child_name, _DepthwiseFullWidth(child))
            if isinstance(getattr(module, child_name), _DepthwiseFullWidth):  # also those of an earlier trace
                out[full] = getattr(module, child_name)
    return out


def _place_depthwise(depthwise: dict, plan: ChannelPlan, index: dict) -> None:
    """Give each depthwise layer its set's index and positions (traced from the index inputs)."""
    for path, layer in depthwise.items():
        g = plan.gathers.get(f"{path}.weight")
        if g is None or g.rows is None:
            continue
        idx = index[g.rows]
        c = plan.sets[g.rows]
        one_hot = (torch.arange(c)[:, None] == idx[None, :]).to(torch.int64)  # (C, k)
        layer.index, layer.positions = idx, (one_hot * (torch.arange(idx.shape[0]) + 1)[None, :]).sum(1)


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
    depthwise = _full_width_depthwise(model)
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
        _place_depthwise(depthwise, plan, index)
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
    depthwise = _full_width_depthwise(model)
    names = [p.name for p in params]
    buffer_names = [b.name for b in buffers]
    set_names = list(plan.sets)

    def forward(x, *flat):
        p_vals, m_vals, b_vals, index = _split(flat, names, mask_names, buffer_names, set_names)
        _place_depthwise(depthwise, plan, index)
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
    t = trace_inputs(model, example_input, params, buffers, masks)
    mask_names, step_outputs = t.mask_names, t.step_outputs
    i_args = [torch.arange(length, dtype=torch.int64) for length in example_lengths(plan, len(t.x)).values()]
    state_inputs = t.state_inputs + [f"channels::{s}" for s in plan.sets]

    train_model, bns = _training_copy(model, dropout)
    step_fn = functools.partial(_make_step_fn, train_model, bns, params, buffers, mask_names, plan)
    step_inputs = list(BATCH_INPUTS) + state_inputs
    args = t.batch_args + t.state_args + i_args
    first = len(args) - len(i_args)
    _export_graph(step_fn, args, len(BATCH_INPUTS), step_inputs, step_outputs, folder / "step.onnx", opset,
                  {first + i: f"k_{s}" for i, s in enumerate(plan.sets)})

    eval_model = copy.deepcopy(model).eval()
    forward_fn = functools.partial(_make_forward_fn, eval_model, params, buffers, mask_names, plan)
    forward_inputs = ["x"] + state_inputs
    args = [t.x] + t.state_args + i_args
    first = len(args) - len(i_args)
    _export_graph(forward_fn, args, 1, forward_inputs, ["logits"], folder / "forward.onnx", opset,
                  {first + i: f"k_{s}" for i, s in enumerate(plan.sets)})
    extra = {"step_inputs": step_inputs, "step_outputs": step_outputs, "forward_inputs": forward_inputs,
             "dropout": dropout, "channels": plan.to_dict()}
    return ["step.onnx", "forward.onnx"], extra
