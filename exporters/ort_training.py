"""Writer of the `ort-training` engine: onnxruntime-training artifacts from a torch model.

The folder gets `training_model.onnx` (forward + loss + gradients), `eval_model.onnx`
(logits in inference mode), `checkpoint` (every parameter, mask and BatchNorm buffer)
and one optimizer graph per optimizer the device may pick at open time
(`optimizer_sgd.onnx`, `optimizer_adamw.onnx`).

The forward graph computes the full engine loss (edgecl.runtime.engine):

    loss = sum_i w_i * CE(z_i, y_i) + sum_i v_i * mean_k (z_ik - t_ik)^2

Facts this module works around (onnxruntime-training 1.19.2, torch 2.13, onnx 1.23):
- masked weights enter the graph as `weight * mask` with the mask a frozen parameter,
  so a mask can be replaced at run time; the TorchScript exporter without constant
  folding keeps the product in the graph (the dynamo exporter with optimize=True folds it);
- tracing a BatchNorm in training mode updates its running statistics, and the exporter
  captures the initializers after the trace: every initializer is reset to the model's
  values from before the export;
- ORT's training graph runs BatchNorm as `BatchNormInternal`, whose updated running
  statistics never reach the checkpoint, and whose running variance uses the biased batch
  variance (torch uses the unbiased one): the updated statistics are extra graph outputs
  `updated::<buffer>`, which the runtime writes back after each step with torch's
  variance correction (needs the per-channel spatial size recorded in `extra`);
- the eval model `generate_artifacts` writes keeps BatchNorm's three training outputs
  with training_mode=0, which ORT refuses to load ("This number of op outputs should be 1
  when Training_mode = False"): the eval model is exported separately in eval mode, with
  the parameters as graph inputs in the training model's order (ORT's Module feeds them
  positionally);
- ORT's AdamW graph defaults to the Hugging Face variant (adam_mode=1): adam_mode is set
  to 0, torch's AdamW; its betas and eps are fixed here, weight decay is left to the
  runtime (0 in the graph);
- the TorchScript exporter merges initializers of equal value in eval mode (a BatchNorm
  bias of zeros and a running mean of zeros become one tensor): exports keep initializers
  as inputs, which turns that off;
- ORT's gradient of SoftmaxCrossEntropyLoss reads its optional log_prob output, which ORT
  adds for some graphs only (mlp and cnn fail in the gradient builder without it): the
  forward graph always declares it;
- ORT's AveragePoolGrad takes its output shape from the graph, batch dimension 0, and a layer
  before an average pool then kills the process with SIGFPE: the training graph computes average
  pools as depthwise convolutions with fixed weights instead (`pool_rewrite`);
- onnx >= 1.18 writes IR versions ORT 1.19.2 refuses: every file is rewritten at IR 10.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from edgecl.runtime.errors import UnsupportedModelError
from edgecl.runtime.manifest import TensorSpec
from edgecl.runtime.optim import OptimizerConfig

from .onnx_files import save_onnx
from .pool_rewrite import average_pools_as_convolutions

TRAIN_INPUTS = ("x", "y", "sample_weight", "target_logits", "logit_weight")
EVAL_INPUTS = ("x",)
MASK_PREFIX = "mask::"
UPDATED_PREFIX = "updated::"
OPTIMIZER_FILES = {"sgd": "optimizer_sgd.onnx", "adamw": "optimizer_adamw.onnx"}
GRAPH_FILES = ("training_model.onnx", "eval_model.onnx", "checkpoint")
# AdamW's betas and eps are attributes of ORT's optimizer graph: fixed at export, to
# OptimizerConfig's defaults (torch's). Weight decay is applied by the runtime instead.
ADAMW_BETAS = OptimizerConfig().betas
ADAMW_EPS = OptimizerConfig().eps


class _MaskedModel(nn.Module):
    """The model with every masked weight computed as `weight_orig * weight_mask` in forward.

    The same mechanism as torch.nn.utils.prune: the Parameter moves to `<attr>_orig`, the
    mask is a buffer `<attr>_mask`, and forward sets the plain attribute before the call.
    """

    def __init__(self, model: nn.Module, masks: dict[str, np.ndarray]):
        super().__init__()
        self.net = model
        self.masked: list[tuple[nn.Module, str]] = []
        self.mask_tensors: dict[str, torch.Tensor] = {}
        for name, mask in masks.items():
            path, _, attr = name.rpartition(".")
            module = model.get_submodule(path)
            weight = module._parameters.pop(attr)
            module.register_parameter(f"{attr}_orig", weight)
            module.register_buffer(f"{attr}_mask", torch.from_numpy(np.array(mask, np.float32)))
            self.mask_tensors[name] = getattr(module, f"{attr}_mask")
            self.masked.append((module, attr))

    def forward(self, x):
        for module, attr in self.masked:
            setattr(module, attr, getattr(module, f"{attr}_orig") * getattr(module, f"{attr}_mask"))
        return self.net(x)


class _LossGraph(nn.Module):
    """Inputs (x, y, sample_weight, target_logits, logit_weight) -> (loss, logits)."""

    def __init__(self, masked: _MaskedModel):
        super().__init__()
        self.masked = masked

    def forward(self, x, y, sample_weight, target_logits, logit_weight):
        logits = self.masked(x)
        ce = nn.functional.cross_entropy(logits, y, reduction="none")
        mse = ((logits - target_logits) ** 2).mean(dim=1)
        loss = (sample_weight * ce).sum() + (logit_weight * mse).sum()
        return loss, logits


def _without_dropout(model: nn.Module) -> None:
    """Replace every nn.Dropout by nn.Identity (dropout stays out of the graph by default)."""
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Dropout):
            parent_path, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent_path), attr, nn.Identity())


def _batchnorm_layers(model: nn.Module, example_input: torch.Tensor) -> list[dict]:
    """Running-statistic buffer names, torch momentum and per-channel spatial size of each BatchNorm2d."""
    found: dict[str, int] = {}

    def record(path):
        return lambda module, inputs, output: found.__setitem__(path, math.prod(inputs[0].shape[2:]))

    hooks = [module.register_forward_hook(record(path))
             for path, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_input[:1])  # eval mode: the running statistics stay as they are
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    layers = []
    for path, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            if path not in found:
                raise UnsupportedModelError(f"BatchNorm layer {path!r} is not used in forward; remove it or use it")
            prefix = f"{path}." if path else ""
            layers.append({"mean": f"{prefix}running_mean", "var": f"{prefix}running_var",
                           "momentum": float(module.momentum), "spatial": int(found[path])})
    return layers


def _export_graph(module: nn.Module, args: tuple, input_names, output_names, training, opset: int) -> onnx.ModelProto:
    """TorchScript export, dynamic batch, one initializer per parameter, buffer and mask.

    No constant folding (W*mask must stay a product). keep_initializers_as_inputs=True
    because otherwise the exporter merges initializers of equal value in eval mode (a
    BatchNorm bias of zeros with a running mean of zeros); the initializers are taken out
    of the graph inputs again here.
    """
    dynamic = {name: {0: "N"} for name in (*input_names, "logits")}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # Expected here: the legacy exporter and its `training=` argument are deprecated (used on
        # purpose, see above); BatchNorm's num_batches_tracked += 1 is dropped from the graph
        # (unused with a float momentum); the tracer notes BatchNorm's batch-size check.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="ONNX Preprocess - Removing mutation")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(module, args, buffer, input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False, do_constant_folding=False,
                          training=training, keep_initializers_as_inputs=True)
    proto = onnx.load_from_string(buffer.getvalue())
    inits = {init.name for init in proto.graph.initializer}
    kept = [i for i in proto.graph.input if i.name not in inits]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    return proto


def _rename_initializers(proto: onnx.ModelProto, rename: dict[str, str], values: dict[str, np.ndarray]) -> None:
    """Rename initializers (and their uses) to graph names and reset them to the pre-export values.

    Raises:
        UnsupportedModelError: a parameter, buffer or mask is missing from the traced graph.
    """
    present = {init.name for init in proto.graph.initializer}
    missing = sorted(graph for export, graph in rename.items() if export not in present)
    if missing:
        raise UnsupportedModelError(
            f"tensors {missing} do not reach the traced graph (unused in forward?); every parameter must be used")
    for init in proto.graph.initializer:
        if init.name in rename:
            graph = rename[init.name]
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(values[graph]), graph))
    for node in proto.graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]


def _add_log_prob_outputs(proto: onnx.ModelProto) -> None:
    """Give SoftmaxCrossEntropyLoss its optional log_prob output, which its ORT gradient reads.

    ORT's graph transformers add it for some graphs and not others (mlp and cnn here: "O(size_t)
    i < node_->OutputDefs().size() was false" in the gradient builder); adding it always is valid ONNX.
    """
    for node in proto.graph.node:
        if node.op_type == "SoftmaxCrossEntropyLoss" and len(node.output) == 1:
            node.output.append(f"{node.output[0]}_log_prob")


def _add_batchnorm_outputs(proto: onnx.ModelProto, layers: list[dict]) -> list[str]:
    """Expose each BatchNorm's updated running mean/var as graph outputs `updated::<buffer>`."""
    dims = {init.name: list(init.dims) for init in proto.graph.initializer}
    wanted = {b for layer in layers for b in (layer["mean"], layer["var"])}
    names = []
    for node in list(proto.graph.node):
        if node.op_type != "BatchNormalization" or len(node.output) < 3:
            continue
        for k, buffer in ((1, node.input[3]), (2, node.input[4])):
            if buffer not in wanted:
                continue
            out = UPDATED_PREFIX + buffer
            proto.graph.node.append(helper.make_node("Identity", [node.output[k]], [out], name=f"expose_{out}"))
            proto.graph.output.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, dims[buffer]))
            names.append(out)
    if set(names) != {UPDATED_PREFIX + b for b in wanted}:
        raise UnsupportedModelError(f"found BatchNorm training outputs for {sorted(names)}; expected one per buffer "
                                    f"of {sorted(wanted)}")
    return names


def _eval_model(proto: onnx.ModelProto, param_order: list[str]) -> onnx.ModelProto:
    """Move the parameters of an inference graph to graph inputs, in the training model's order."""
    inits = {init.name: init for init in proto.graph.initializer}
    kept = [init for init in proto.graph.initializer if init.name not in param_order]
    for name in param_order:
        if name in inits:
            init = inits[name]
            proto.graph.input.append(helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
        else:  # ORT's Module feeds every parameter of the training model to the eval model, by position
            raise UnsupportedModelError(f"parameter {name!r} is missing from the inference graph")
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    return proto


def _optimizer_models(opset: int) -> dict[str, onnx.ModelProto]:
    """ORT's SGD and AdamW optimizer graphs; AdamW switched to torch's variant (adam_mode=0)."""
    from onnxruntime.training import onnxblock

    # The optimizer graphs read only the parameters' element type: one float32 stand-in suffices.
    params = ([numpy_helper.from_array(np.zeros(1, np.float32), "p")], [])
    blocks = {"sgd": onnxblock.optim.SGD(),
              "adamw": onnxblock.optim.AdamW(betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=0.0)}
    out = {}
    for kind, block in blocks.items():
        with onnxblock.empty_base(opset_version=opset):
            block(params)
            proto = block.to_model_proto()
        for node in proto.graph.node:
            if node.op_type == "AdamWOptimizer":
                for attr in node.attribute:
                    if attr.name == "adam_mode":
                        attr.i = 0  # 0: torch.optim.AdamW's update; ORT's default 1 is Hugging Face's
        out[kind] = proto
    return out


@contextlib.contextmanager
def _quiet_gradient_builder():
    """Silence the ~60 INFO lines per graph transformer that ORT's gradient builder prints.

    generate_artifacts creates its SessionOptions internally (no argument reaches them) and
    their default severity prints INFO; the factory is swapped for one at ERROR while it runs.
    """
    from onnxruntime.training.onnxblock import _training_graph_utils

    original = _training_graph_utils.SessionOptions

    def quiet_options():
        options = original()
        options.log_severity_level = 3
        return options

    _training_graph_utils.SessionOptions = quiet_options
    try:
        yield
    finally:
        _training_graph_utils.SessionOptions = original


def write_ort_training(model: nn.Module, example_input: torch.Tensor, folder: Path, params: tuple[TensorSpec, ...],
                       buffers: tuple[TensorSpec, ...], masks: dict[str, np.ndarray], opset: int,
                       dropout: bool) -> tuple[list[str], dict]:
    """Write onnxruntime-training artifacts for `model` into `folder`.

    Args:
        model: a supported torch model (not modified); parameters named as in `params`.
        example_input: float32 (N, *input_shape); N is dynamic in the graphs.
        folder: an existing, empty folder.
        params / buffers: the manifest's specs (trainable flags and masked names).
        masks: parameter name -> initial 0/1 float32 mask; masks become frozen parameters
            `mask::<name>` of the checkpoint, replaceable at run time.
        opset: ONNX opset of the graphs. dropout: keep Dropout active in the training graph.
    Returns:
        (file names written, `extra` for the manifest: graph input/output names, mask and
        BatchNorm details, optimizer files and the AdamW hyper-parameters fixed in its graph).
    Raises:
        UnsupportedModelError: a parameter, buffer or BatchNorm the graphs cannot carry, or an
            op onnxruntime-training has no gradient for.
    """
    from onnxruntime.training import artifacts

    folder = Path(folder)
    model = copy.deepcopy(model)
    if not dropout:
        _without_dropout(model)
    # Values before any trace (tracing BatchNorm in training mode moves its running statistics).
    model_buffers = dict(model.named_buffers())
    values = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    values.update({b.name: model_buffers[b.name].detach().numpy().copy() for b in buffers})
    values.update({MASK_PREFIX + n: np.array(m, np.float32) for n, m in masks.items()})
    layers = _batchnorm_layers(model, example_input)
    with torch.no_grad():
        num_classes = int(model.eval()(example_input[:1]).shape[1])
    model.train()

    tensors = dict(model.named_parameters())
    tensors.update({b.name: model_buffers[b.name] for b in buffers})
    masked = _MaskedModel(model, masks)
    tensors.update({MASK_PREFIX + n: t for n, t in masked.mask_tensors.items()})
    graph_of = {id(t): name for name, t in tensors.items()}
    loss_graph = _LossGraph(masked)
    named = (*loss_graph.named_parameters(), *loss_graph.named_buffers())
    rename = {export: graph_of[id(t)] for export, t in named if id(t) in graph_of}  # export name -> graph name

    # Two rows at least: torch refuses a training BatchNorm over a single value per channel.
    x = example_input if len(example_input) >= 2 else torch.cat([example_input, example_input])
    n = len(x)
    args = (x, torch.zeros(n, dtype=torch.int64), torch.full((n,), 1.0 / n), torch.zeros(n, num_classes),
            torch.zeros(n))
    train_proto = _export_graph(loss_graph.train(), args, TRAIN_INPUTS, ("loss", "logits"),
                                torch.onnx.TrainingMode.TRAINING, opset)
    _rename_initializers(train_proto, rename, values)
    _add_log_prob_outputs(train_proto)
    average_pools_as_convolutions(train_proto)
    updated = _add_batchnorm_outputs(train_proto, layers)
    eval_proto = _export_graph(masked, (x,), EVAL_INPUTS, ("logits",), torch.onnx.TrainingMode.EVAL, opset)
    _rename_initializers(eval_proto, {k.removeprefix("masked."): v for k, v in rename.items()}, values)

    trainable = [p.name for p in params if p.trainable]
    frozen = [name for name in values if name not in set(trainable)]
    try:
        with _quiet_gradient_builder():
            artifacts.generate_artifacts(train_proto, requires_grad=trainable, frozen_params=frozen, loss=None,
                                         optimizer=None, artifact_directory=folder)
    except RuntimeError as e:  # ORT's gradient builder: an op without a gradient, or a graph it cannot take
        raise UnsupportedModelError(f"onnxruntime-training cannot build the training graph of this model: {e}") from e
    training = onnx.load(str(folder / "training_model.onnx"))
    param_order = [i.name for i in training.graph.input if i.name in values]
    save_onnx(training, folder / "training_model.onnx")
    save_onnx(_eval_model(eval_proto, param_order), folder / "eval_model.onnx")
    for kind, proto in _optimizer_models(opset).items():
        save_onnx(proto, folder / OPTIMIZER_FILES[kind])

    extra = {
        "train_inputs": list(TRAIN_INPUTS),
        "train_outputs": ["loss", "logits", *updated],
        "eval_inputs": list(EVAL_INPUTS),
        "eval_outputs": ["logits"],
        "param_graph_names": {p.name: p.name for p in params},
        "mask_graph_names": {name: MASK_PREFIX + name for name in masks},
        "buffer_graph_names": {b.name: b.name for b in buffers},
        "batchnorm": layers,
        "optimizer_files": dict(OPTIMIZER_FILES),
        "adamw": {"betas": list(ADAMW_BETAS), "eps": ADAMW_EPS, "adam_mode": 0, "weight_decay": "runtime"},
        "sgd": {"momentum": "runtime", "weight_decay": "runtime"},
        "dropout": bool(dropout),
    }
    return [*GRAPH_FILES, *OPTIMIZER_FILES.values()], extra
