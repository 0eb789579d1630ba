"""What the exporter needs to know about a torch model before tracing it.

Turns the user's `masks=` and `trainable=` arguments into `TensorSpec`s and initial
mask arrays, and refuses unsupported layers before any file is written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from edgecl.runtime.errors import UnsupportedModelError
from edgecl.runtime.manifest import TensorSpec

# Leaf modules whose forward and backward the step graphs reproduce (see README table).
SUPPORTED_MODULES = (
    nn.Linear, nn.Conv2d, nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.Flatten, nn.BatchNorm2d, nn.Dropout, nn.Identity,
)
CONTAINER_MODULES = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def check_supported(model: nn.Module) -> None:
    """Raise if a leaf module is not supported, naming its path and type.

    Raises:
        UnsupportedModelError: e.g. "layer 'features.3' is nn.GELU; supported: ...".
    """
    for path, module in model.named_modules():
        if isinstance(module, CONTAINER_MODULES) or not isinstance(module, nn.Module):
            continue
        has_children = any(True for _ in module.children())
        if has_children:
            continue  # a user-defined block: its leaves are checked, its ops at trace time
        if not isinstance(module, SUPPORTED_MODULES) and path != "":
            raise UnsupportedModelError(
                f"layer {path!r} is {type(module).__module__}.{type(module).__name__}, which edgecl cannot export; "
                f"supported: {', '.join(m.__name__ for m in SUPPORTED_MODULES)}"
            )
        if isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size not in (1, (1, 1)):
            raise UnsupportedModelError(f"layer {path!r} is AdaptiveAvgPool2d({module.output_size}); supported: output size 1")
        if isinstance(module, nn.BatchNorm2d) and (module.momentum is None or not module.track_running_stats):
            raise UnsupportedModelError(
                f"layer {path!r} is BatchNorm2d with momentum={module.momentum}, track_running_stats="
                f"{module.track_running_stats}; supported: a float momentum and tracked running statistics"
            )
        if isinstance(module, nn.MaxPool2d) and (module.ceil_mode or module.return_indices):
            raise UnsupportedModelError(f"layer {path!r} is MaxPool2d with ceil_mode/return_indices; supported: neither")
        if isinstance(module, nn.AvgPool2d) and (module.ceil_mode or module.divisor_override):
            raise UnsupportedModelError(f"layer {path!r} is AvgPool2d with ceil_mode/divisor_override; supported: neither")


def check_logits(model: nn.Module, example_input: torch.Tensor) -> int:
    """The number of classes: the width of the model's output, which must be (N, classes) float logits.

    Raises:
        UnsupportedModelError: any other output (a tuple, a feature map, one column), naming its shape.
    """
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(example_input)
    finally:
        model.train(was_training)
    n = example_input.shape[0]
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.ndim != 2 or out.shape[0] != n \
            or out.shape[1] < 2:
        raise UnsupportedModelError(
            f"model output is {shape}{f' {out.dtype}' if isinstance(out, torch.Tensor) else ''} for an input of "
            f"shape {tuple(example_input.shape)}; accepted: float32 logits of shape ({n}, classes) with classes >= 2 "
            "(end the model with a Linear layer, or Flatten after a pool to 1x1)")
    return int(out.shape[1])


def default_mask_names(model: nn.Module) -> list[str]:
    """Weights of every Conv2d and Linear layer: what SparCL sparsifies."""
    return [f"{path}.weight" if path else "weight" for path, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def resolve_masks(model: nn.Module, masks) -> dict[str, np.ndarray]:
    """Initial 0/1 float32 masks by parameter name.

    Args:
        masks: None (no masks), "weights" (every Conv2d / Linear weight), an iterable of
            parameter names (masks start at all ones), or a mapping name -> 0/1 array.
    Raises:
        ValueError / KeyError: unknown name, wrong shape, values other than 0 and 1.
    """
    params = dict(model.named_parameters())
    if masks is None:
        return {}
    if isinstance(masks, str):
        if masks != "weights":
            raise ValueError(f"masks={masks!r}; accepted: None, 'weights', parameter names, or a name -> array mapping")
        masks = default_mask_names(model)
    if not isinstance(masks, Mapping):
        masks = {name: None for name in masks}
    out = {}
    for name, value in masks.items():
        if name not in params:
            raise KeyError(f"mask for {name!r}: no such parameter; accepted: {', '.join(params)}")
        shape = tuple(params[name].shape)
        arr = np.ones(shape, np.float32) if value is None else np.asarray(
            value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value, dtype=np.float32)
        if arr.shape != shape:
            raise ValueError(f"mask for {name!r} has shape {arr.shape}; accepted: {shape}")
        if not np.isin(arr, (0.0, 1.0)).all():
            raise ValueError(f"mask for {name!r} holds values other than 0 and 1")
        out[name] = arr
    return out


def resolve_trainable(model: nn.Module, trainable: Iterable[str] | None) -> set[str]:
    """Names of the parameters that train (None: all of them)."""
    names = [n for n, _ in model.named_parameters()]
    if trainable is None:
        return set(names)
    if isinstance(trainable, str):
        raise ValueError(f"trainable={trainable!r}; accepted: None or an iterable of parameter names")
    chosen = set(trainable)
    unknown = chosen - set(names)
    if unknown:
        raise KeyError(f"trainable names {sorted(unknown)} are not parameters; accepted: {', '.join(names)}")
    if not chosen:
        raise ValueError("trainable is empty; at least one parameter must train")
    return chosen


def tensor_specs(model: nn.Module, masks: Mapping[str, np.ndarray], trainable: set[str]):
    """(parameter specs in torch order, buffer specs) for the manifest."""
    params = tuple(
        TensorSpec(name=n, shape=tuple(p.shape), trainable=n in trainable, masked=n in masks)
        for n, p in model.named_parameters()
    )
    buffers = tuple(
        TensorSpec(name=n, shape=tuple(b.shape), trainable=False)
        for n, b in model.named_buffers()
        if b.dtype.is_floating_point  # BatchNorm num_batches_tracked is only needed with momentum=None
    )
    return params, buffers


# ATen ops (as seen below autograd) that the supported layers and residual adds produce,
# and whose backward both training graphs reproduce.
SUPPORTED_OPS = frozenset({
    "addmm", "mm", "t", "view", "_unsafe_view", "reshape", "flatten", "permute", "expand", "detach", "clone",
    "alias", "empty", "empty_like", "relu", "hardtanh", "convolution", "max_pool2d_with_indices", "avg_pool2d",
    "mean", "_adaptive_avg_pool2d", "add", "add_", "sub", "mul", "div", "div_", "native_batch_norm",
    "_native_batch_norm_legit", "_native_batch_norm_legit_functional", "bernoulli_", "native_dropout",
})


def check_ops(model: nn.Module, example_input: torch.Tensor) -> None:
    """Run one training-mode forward and refuse any ATen op outside SUPPORTED_OPS.

    Raises:
        UnsupportedModelError: naming the op and the module path it ran in.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    stack: list[str] = ["<model>"]

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            op = func.overloadpacket.__name__
            if op not in SUPPORTED_OPS:
                raise UnsupportedModelError(
                    f"op aten.{op} in module {stack[-1]!r} cannot be exported to a training graph; "
                    f"supported ops: {', '.join(sorted(SUPPORTED_OPS))}"
                )
            return func(*args, **(kwargs or {}))

    def enter(path):
        return lambda module, args: stack.append(path) and None

    def leave(module, args, output):
        stack.pop()  # returns None: a forward hook's return value would replace the output

    handles = []
    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(path or "<model>")))
        handles.append(module.register_forward_hook(leave))
    was_training = model.training
    try:
        model.train()
        sample = example_input[:2].clone()
        with torch.no_grad(), Recorder():
            model(sample)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
