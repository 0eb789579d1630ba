"""The layer table: per Conv2d/Linear forward cost and shapes of one sample, for the manifest.

The runtime has no torch, so the exporter measures what FLOPs counting
(`edgecl.runtime.flops`) and the memory budget need once, on the host, with forward
hooks, and stores it in `manifest.extra["layers"]` and
`manifest.extra["activation_bytes_per_sample"]`.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def _one_sample(model: nn.Module, example_input: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    if not isinstance(example_input, torch.Tensor) or example_input.ndim < 2 or example_input.shape[0] < 1:
        raise ValueError("example_input must be a torch.Tensor of shape (N, *input_shape) with N >= 1")
    # A copy in eval mode: BatchNorm statistics stay untouched, one sample is a valid batch,
    # and no layer changes a shape between train and eval mode.
    return copy.deepcopy(model).eval(), example_input[:1].detach().clone()


def _macs(module: nn.Module, out: torch.Tensor) -> int:
    """Multiply-accumulates of one sample's forward (bias additions not counted, as torch's FLOP counter)."""
    if isinstance(module, nn.Conv2d):
        # each output element is a dot product over (C_in / groups) * kh * kw inputs
        return out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    return out.numel() * module.in_features


def layer_table(model: nn.Module, example_input: torch.Tensor) -> list[dict]:
    """One row per Conv2d/Linear call in forward order, for one sample.

    Each row holds JSON values:
        path: module path ("" for the root); kind: "Conv2d" or "Linear";
        weight / bias: parameter names as in `named_parameters()` (bias None if absent);
        weight_shape: list of ints; groups: conv groups (1 for Linear);
        macs_per_sample: forward multiply-accumulates, groups respected;
        in_elements / out_elements: elements of the layer's input and output per sample;
        needs_input_grad: whether the input depends on any parameter, i.e. backprop must
            compute the gradient with respect to it (False for the first layer).
    A module called twice (shared weights) gives two rows with the same names.

    Args:
        model: the torch model (not modified). example_input: (N, *input_shape); only the first sample runs.
    Returns:
        list of row dicts.
    Raises:
        ValueError: example_input is not a batched tensor.
    """
    model, x = _one_sample(model, example_input)
    rows: list[dict] = []

    def record(path: str):
        def hook(module, inputs, output):
            prefix = f"{path}." if path else ""
            rows.append({
                "path": path, "kind": type(module).__name__, "weight": f"{prefix}weight",
                "bias": f"{prefix}bias" if module.bias is not None else None,
                "weight_shape": list(module.weight.shape),
                "groups": module.groups if isinstance(module, nn.Conv2d) else 1,
                "macs_per_sample": int(_macs(module, output)),
                "in_elements": int(inputs[0].numel()), "out_elements": int(output.numel()),
                "needs_input_grad": bool(inputs[0].requires_grad),
            })
        return hook

    handles = [m.register_forward_hook(record(p)) for p, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        for p in model.parameters():
            p.requires_grad_(True)  # a frozen layer still passes gradients through to earlier trainable ones
        with torch.enable_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return rows


def activation_bytes_per_sample(model: nn.Module, example_input: torch.Tensor) -> int:
    """Bytes of the tensors one sample's forward keeps for the backward pass (an estimate).

    Method: the input plus the output of every leaf module (Conv2d, BatchNorm2d, ReLU,
    pooling, ...), each counted once at its dtype size; outputs that share storage with
    their input (Flatten of a contiguous tensor, Identity, in-place ReLU, Dropout in
    eval mode) add nothing. Functional ops outside modules (a residual add) are not
    counted; the output of the ReLU after them, which backward keeps, is. Autograd may
    keep a little more (max-pool indices, BatchNorm's per-channel statistics) or less.

    Args:
        model: the torch model (not modified). example_input: (N, *input_shape).
    Returns:
        bytes per sample; multiply by the batch size.
    """
    model, x = _one_sample(model, example_input)
    total = [x.numel() * x.element_size()]

    def hook(module, inputs, output):
        if not isinstance(output, torch.Tensor):
            return
        inp = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        if inp is not None and output.untyped_storage().data_ptr() == inp.untyped_storage().data_ptr():
            return  # a view or in-place result: no new memory
        total[0] += output.numel() * output.element_size()

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return int(total[0])
