"""The portable engine's artifacts: a standard-ONNX step graph and a forward graph.

`step.onnx` computes, in plain ONNX ops any ONNX Runtime runs (x86-64, aarch64, Android,
iOS), the loss, the logits, the gradient of every trainable parameter and the updated
BatchNorm running statistics from one batch. Parameters, masks and running statistics
are graph *inputs*, so the device owns them as numpy arrays and updates them itself.

How: the joint forward+backward of `torch.func.functional_call` is traced with
`make_fx` (symbolic batch size, core ATen decompositions plus the hand-written backward
decompositions in `backward_ops`), then translated by the dynamo ONNX exporter's
translator without its re-traces or its optimizer (which would constant-fold
weight * mask): `fx_onnx`.

Graph inputs:  x, y, sample_weight, target_logits, logit_weight, param::<name>...,
               mask::<name>..., buffer::<name>...
Graph outputs: loss, logits, grad::<name>... (trainable only), buffer_out::<name>...
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from edgecl.runtime.manifest import TensorSpec

from .fx_onnx import decomposition_table, is_functional, to_onnx
from .onnx_files import save_onnx
from .quiet import quiet_onnx_export
from .train_batchnorm import TrainBatchNorm2d

BATCH_INPUTS = ("x", "y", "sample_weight", "target_logits", "logit_weight")


class _TrainDropout(nn.Module):
    """Dropout in training mode as `x * (uniform >= p) / (1 - p)`: exports to RandomUniformLike."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        keep = (torch.rand_like(x) >= self.p).to(x.dtype)
        return x * keep * (1.0 / (1.0 - self.p))


def _training_copy(model: nn.Module, dropout: bool) -> tuple[nn.Module, dict[str, TrainBatchNorm2d]]:
    """A copy of `model` with functional BatchNorm and (unless asked) Dropout removed."""
    model = copy.deepcopy(model).train()
    bns = {}
    for path, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{path}.{child_name}" if path else child_name
            if isinstance(child, nn.BatchNorm2d):
                bns[full] = TrainBatchNorm2d(child)
                setattr(module, child_name, bns[full])
            elif isinstance(child, nn.Dropout):
                setattr(module, child_name, _TrainDropout(child.p) if dropout else nn.Identity())
    return model, bns


def weighted_loss(logits, y, sample_weight, target_logits, logit_weight):
    """sum_i w_i CE(z_i, y_i) + sum_i v_i mean_k (z_ik - t_ik)^2 (see edgecl.runtime.engine)."""
    ce = F.cross_entropy(logits, y, reduction="none")
    mse = ((logits - target_logits) ** 2).mean(dim=1)
    return (sample_weight * ce).sum() + (logit_weight * mse).sum()


def _make_step_fn(model, bns, params, buffers, mask_names, functional: bool):
    """The step as a function of flat tensors; `functional`: the model's forward runs under
    `torch.func.functionalize` (its in-place ops become out-of-place ones)."""
    names = [p.name for p in params]
    trainable = [p.name for p in params if p.trainable]
    buffer_names = [b.name for b in buffers]
    bn_of_buffer = {b: (path, 0 if b.endswith("running_mean") else 1) for path in bns for b in buffer_names
                    if b.rsplit(".", 1)[0] == path}

    def forward(state, x):  # the new running statistics as outputs: nothing escapes functionalize
        logits = torch.func.functional_call(model, state, (x,), strict=False)
        return logits, {path: bn.new_stats for path, bn in bns.items()}

    forward = torch.func.functionalize(forward) if functional else forward

    def step(x, y, sample_weight, target_logits, logit_weight, *flat):
        p_vals = dict(zip(names, flat[: len(names)]))
        m_vals = dict(zip(mask_names, flat[len(names) : len(names) + len(mask_names)]))
        b_vals = dict(zip(buffer_names, flat[len(names) + len(mask_names) :]))
        for n in trainable:
            p_vals[n].requires_grad_(True)
        effective = {n: (p_vals[n] * m_vals[n] if n in m_vals else p_vals[n]) for n in names}
        logits, stats = forward({**effective, **b_vals}, x)
        loss = weighted_loss(logits, y, sample_weight, target_logits, logit_weight)
        grads = torch.autograd.grad(loss, [p_vals[n] for n in trainable])
        new_buffers = [stats[bn_of_buffer[b][0]][bn_of_buffer[b][1]] for b in buffer_names]
        return (loss, logits, *grads, *new_buffers)

    return step


def _make_forward_fn(model, params, buffers, mask_names, functional: bool):
    names = [p.name for p in params]
    buffer_names = [b.name for b in buffers]

    def forward(x, *flat):
        p_vals = dict(zip(names, flat[: len(names)]))
        m_vals = dict(zip(mask_names, flat[len(names) : len(names) + len(mask_names)]))
        b_vals = dict(zip(buffer_names, flat[len(names) + len(mask_names) :]))
        effective = {n: (p_vals[n] * m_vals[n] if n in m_vals else p_vals[n]) for n in names}
        return (torch.func.functional_call(model, {**effective, **b_vals}, (x,), strict=False),)

    return torch.func.functionalize(forward) if functional else forward


def _rename_io(proto: onnx.ModelProto, inputs: list[str], outputs: list[str], dims: dict[str, str]) -> onnx.ModelProto:
    """Give graph inputs and outputs stable names (the exporter numbers them arg0_1, ...), and
    symbolic dimensions the names in `dims` (make_fx numbers them s0, s1, ...)."""
    graph = proto.graph
    for vi in (*graph.input, *graph.output, *graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in dims:
                d.dim_param = dims[d.dim_param]
    if len(graph.input) != len(inputs) or len(graph.output) != len(outputs):
        raise RuntimeError(f"exported graph has {len(graph.input)} inputs / {len(graph.output)} outputs, "
                           f"expected {len(inputs)} / {len(outputs)}")
    rename = {old.name: new for old, new in zip(graph.input, inputs)}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for vi, new in zip(graph.input, inputs):
        vi.name = new
    # An Identity per output: two outputs may share one tensor, or an output may be an input.
    for vi, new in zip(graph.output, outputs):
        graph.node.append(onnx.helper.make_node("Identity", [rename.get(vi.name, vi.name)], [new]))
        vi.name = new
    return proto


def _trace(make_fn, args, n_batch_args: int, opset: int, channel_args=()) -> tuple[torch.fx.GraphModule, list[str]]:
    """make_fx of `make_fn(functional=False)` with only the batch dimension of the first
    `n_batch_args` inputs symbolic, and the length of the 1-D inputs at positions `channel_args`
    (the structured graph's channel indices; their examples must have distinct lengths >= 2, or
    the trace would take two of them, or a length and the batch size, for one symbol).

    (tracing_mode="symbolic" makes every dimension of every parameter symbolic too, and
    is 5-10x slower for the same graph.) A graph that mutates a tensor (a user's in-place
    `out += x`) is traced once more from `make_fn(functional=True)`.

    Returns:
        (graph, the names of its symbols: the batch size's, then one per `channel_args` entry).
    """
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)

    def fake(i, a):
        if i in channel_args:
            return mode.from_tensor(a, symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC]))
        if i >= n_batch_args:  # no symbols at all: a symbol per static dimension cost 1 s on ResNet-18
            return mode.from_tensor(a, static_shapes=True)
        dims = [DimDynamic.DYNAMIC if d == 0 else DimDynamic.STATIC for d in range(a.ndim)]
        return mode.from_tensor(a, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))

    fake_args = [fake(i, a) for i, a in enumerate(args)]
    table = decomposition_table(opset)
    with mode:
        traced = make_fx(make_fn(functional=False), decomposition_table=table, tracing_mode="real")(*fake_args)
        if not is_functional(traced):
            traced = make_fx(make_fn(functional=True), decomposition_table=table, tracing_mode="real")(*fake_args)
    return traced, [str(fake_args[i].shape[0]) for i in (0, *channel_args)]


def _export_graph(make_fn, args, n_batch_args: int, input_names, output_names, path: Path, opset: int,
                  channel_args: dict[int, str] | None = None) -> None:
    """Trace, translate and save one graph; `channel_args`: position of a channel-index input -> the
    name its length gets in the graph."""
    channel_args = channel_args or {}
    with quiet_onnx_export():
        traced, symbols = _trace(make_fn, args, n_batch_args, opset, tuple(channel_args))
        proto = to_onnx(traced, opset)
    dims = dict(zip(symbols, ["N", *channel_args.values()]))
    save_onnx(_rename_io(proto, list(input_names), list(output_names), dims), path)


@dataclasses.dataclass(frozen=True)
class TraceInputs:
    """What the step and forward graphs are traced with (`trace_inputs`), shared by both writers.

    x: the example batch (2-4 samples); batch_args: x and the loss inputs of BATCH_INPUTS for it;
    state_args / state_inputs: clones of the parameters, the masks and the buffers, and their graph
    input names; step_outputs: loss, logits, one gradient per trainable parameter, the new buffers.
    """

    mask_names: list
    x: torch.Tensor
    batch_args: list
    state_args: list
    state_inputs: list
    step_outputs: list


def trace_inputs(model: nn.Module, example_input: torch.Tensor, params: tuple[TensorSpec, ...],
                 buffers: tuple[TensorSpec, ...], masks: dict[str, np.ndarray]) -> TraceInputs:
    """The example inputs of the graphs' traces (the model ends in train mode)."""
    mask_names = [p.name for p in params if p.masked]
    named_params, named_buffers = dict(model.named_parameters()), dict(model.named_buffers())
    x = example_input[: max(2, min(4, len(example_input)))].clone()
    if len(x) < 2:
        x = torch.cat([x, x])
    n = len(x)
    with torch.no_grad():
        k = int(model.eval()(x).shape[1])
    model.train()
    state_args = ([named_params[p.name].detach().clone() for p in params]
                  + [torch.from_numpy(masks[name]) for name in mask_names]
                  + [named_buffers[b.name].detach().clone() for b in buffers])
    state_inputs = ([f"param::{p.name}" for p in params] + [f"mask::{m}" for m in mask_names]
                    + [f"buffer::{b.name}" for b in buffers])
    batch_args = [x, torch.zeros(n, dtype=torch.int64), torch.full((n,), 1.0 / n), torch.zeros(n, k), torch.zeros(n)]
    step_outputs = (["loss", "logits"] + [f"grad::{p.name}" for p in params if p.trainable]
                    + [f"buffer_out::{b.name}" for b in buffers])
    return TraceInputs(mask_names, x, batch_args, state_args, state_inputs, step_outputs)


def write_portable(model: nn.Module, example_input: torch.Tensor, folder: Path, params: tuple[TensorSpec, ...],
                   buffers: tuple[TensorSpec, ...], masks: dict[str, np.ndarray], opset: int, dropout: bool):
    """Write `step.onnx` and `forward.onnx` into `folder`.

    Returns:
        (file names written, manifest `extra` with the graphs' input and output names).
    """
    t = trace_inputs(model, example_input, params, buffers, masks)
    mask_names = t.mask_names
    train_model, bns = _training_copy(model, dropout)
    step_fn = functools.partial(_make_step_fn, train_model, bns, params, buffers, mask_names)
    step_inputs = list(BATCH_INPUTS) + t.state_inputs
    _export_graph(step_fn, t.batch_args + t.state_args, len(BATCH_INPUTS), step_inputs, t.step_outputs,
                  folder / "step.onnx", opset)

    eval_model = copy.deepcopy(model).eval()
    forward_fn = functools.partial(_make_forward_fn, eval_model, params, buffers, mask_names)
    forward_inputs = ["x"] + t.state_inputs
    _export_graph(forward_fn, [t.x] + t.state_args, 1, forward_inputs, ["logits"],
                  folder / "forward.onnx", opset)
    extra = {"step_inputs": step_inputs, "step_outputs": t.step_outputs, "forward_inputs": forward_inputs,
             "dropout": dropout}
    return ["step.onnx", "forward.onnx"], extra
