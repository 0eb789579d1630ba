"""Latent replay: a model split at a named point into a frozen prefix and a trained suffix.

`export(..., split=point)` writes the suffix's training graphs (their input is the prefix's
output, the latent) and `prefix.onnx`, the prefix's forward pass in inference mode (BatchNorm
on its running statistics) with its weights and statistics as graph inputs, so a device can
encode with the prefix it trained itself. Parameter names stay the full model's
("layers.2.conv1.weight"), so weights move between the full model and the two parts by name.

Split points: a top-level child of an `nn.Sequential` ("3": the prefix is children 0..3), or for
`SmallResNet` / `resnet18` "stem" (conv1, bn1, relu) or a residual block "layers.<i>".
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from torch import nn

from edgecl.runtime.latent import PREFIX_FILE

from .models import SmallResNet
from .portable import _export_graph, _make_forward_fn
from .spec import tensor_specs


class _Part(nn.Module):
    """Some of a model's modules run in order, registered under their names in the model."""

    def __init__(self, steps: list[tuple[str, nn.Module]]):
        super().__init__()
        self.order = [name for name, _ in steps]
        for name, module in steps:
            parent = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, module)

    def forward(self, x):
        for name in self.order:
            x = self.get_submodule(name)(x)
        return x


def _steps(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], dict[str, int]]:
    """(the model's modules in execution order, split point -> index of the last prefix step)."""
    if isinstance(model, nn.Sequential):
        steps = list(model.named_children())
        return steps, {name: i for i, (name, _) in enumerate(steps)}
    if type(model) is SmallResNet:  # its forward: conv1, bn1, relu, layers, pool, flatten, linear
        blocks = [(f"layers.{n}", b) for n, b in model.layers.named_children()]
        steps = [("conv1", model.conv1), ("bn1", model.bn1), ("relu", model.relu), *blocks,
                 ("pool", model.pool), ("flatten", model.flatten), ("linear", model.linear)]
        return steps, {"stem": 2, **{name: 3 + i for i, (name, _) in enumerate(blocks)}}
    return [], {}


def split_points(model: nn.Module) -> list[str]:
    """The points `split_model` accepts: both parts then hold parameters."""
    steps, points = _steps(model)
    has_params = [any(True for _ in m.parameters()) for _, m in steps]
    return [p for p, i in points.items() if any(has_params[: i + 1]) and any(has_params[i + 1 :])]


def split_model(model: nn.Module, point: str) -> tuple[nn.Module, nn.Module]:
    """(prefix, suffix) of a copy of `model`, cut after `point`; prefix(x) fed to suffix = model(x).

    Raises:
        ValueError: `point` is not one of `split_points(model)` (the message lists them), or the
            model is of a kind that cannot be split.
    """
    accepted = split_points(model)
    if not accepted:
        raise ValueError(f"split={point!r}: a {type(model).__name__} cannot be split; accepted: an nn.Sequential or "
                         "a SmallResNet / resnet18 with parameters on both sides of the point")
    if point not in accepted:
        raise ValueError(f"split={point!r} is no split point of this {type(model).__name__}; accepted: "
                         f"{', '.join(map(repr, accepted))}")
    steps, points = _steps(copy.deepcopy(model))
    cut = points[point] + 1
    return _Part(steps[:cut]), _Part(steps[cut:])


def write_prefix(prefix: nn.Module, example_input: torch.Tensor, folder: Path, opset: int) -> tuple[dict, dict]:
    """Write `prefix.onnx` (inputs x, param::<name>..., buffer::<name>...; output latent).

    Returns:
        (manifest extra["latent"] without the split point, the prefix's initial state by npz key).
    """
    prefix = copy.deepcopy(prefix).eval()
    params, buffers = tensor_specs(prefix, {}, set())
    named_params, named_buffers = dict(prefix.named_parameters()), dict(prefix.named_buffers())
    x = example_input[: max(2, min(4, len(example_input)))].clone()
    x = torch.cat([x, x]) if len(x) < 2 else x
    args = ([x] + [named_params[p.name].detach().clone() for p in params]
            + [named_buffers[b.name].detach().clone() for b in buffers])
    inputs = ["x"] + [f"param::{p.name}" for p in params] + [f"buffer::{b.name}" for b in buffers]
    forward_fn = functools.partial(_make_forward_fn, prefix, params, buffers, [])
    _export_graph(forward_fn, args, 1, inputs, ["latent"], folder / PREFIX_FILE, opset)
    with torch.no_grad():
        latent_shape = list(prefix(x).shape[1:])
    state = {f"prefix::param::{p.name}": named_params[p.name].detach().numpy() for p in params}
    state.update({f"prefix::buffer::{b.name}": named_buffers[b.name].detach().numpy() for b in buffers})
    extra = {"input_shape": list(example_input.shape[1:]), "latent_shape": latent_shape,
             "prefix_parameters": {p.name: list(p.shape) for p in params},
             "prefix_buffers": {b.name: list(b.shape) for b in buffers}, "prefix_inputs": inputs}
    return extra, state
