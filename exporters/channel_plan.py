"""Which output channels of a model can be pruned as a whole, and how each tensor follows them.

A *channel set* is the output channels of one Conv2d / Linear layer, or of several joined
by a residual add (they must keep the same channels). The structured step graph
(`structured`) takes one int64 index per set, the active channels, and gathers every
tensor that touches them: the producing layer's weight rows, bias and the BatchNorm
parameters and statistics after it, the consuming layer's weight columns (a Linear after
a Flatten takes every pixel of each active channel). Depthwise layers follow their input
channels. What reaches the model input or output stays full: the stem's input channels,
the classifier's outputs.

Found from a `torch.fx` trace of the model (call_module per supported layer, `+` for
residual adds) with the shapes of one example batch.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import operator

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from edgecl.runtime.errors import UnsupportedModelError

# (not AvgPool2d: its backward is a Conv with one group per channel, and ONNX's group count is an attribute)
PASSTHROUGH = (nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity)
ADDS = (operator.add, torch.add)
_FULL = "<full>"  # the union-find root of everything that must keep all its channels


@dataclasses.dataclass(frozen=True)
class Gather:
    """How one tensor is narrowed: rows by set `rows`, columns by set `cols` (None: all), each
    column index standing for `repeat` consecutive columns (a Linear after Flatten)."""

    rows: str | None
    cols: str | None = None
    repeat: int = 1

    def to_list(self) -> list:
        return [self.rows, self.cols, self.repeat]


@dataclasses.dataclass(frozen=True)
class ChannelPlan:
    """sets: set name (its first layer's path) -> number of channels; gathers: tensor name
    (parameter or buffer, torch's names) -> Gather, for every tensor that follows a set."""

    sets: dict[str, int]
    gathers: dict[str, Gather]

    def to_dict(self) -> dict:
        return {"sets": dict(self.sets), "gathers": {n: g.to_list() for n, g in self.gathers.items()}}


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


class _Sets:
    """Union-find over set ids; the root of a joined class is its earliest set."""

    def __init__(self):
        self.parent: dict[str, str] = {_FULL: _FULL}
        self.order: list[str] = []
        self.size: dict[str, int] = {}

    def new(self, name: str, size: int) -> str:
        self.parent[name], self.size[name] = name, size
        self.order.append(name)
        return name

    def find(self, s: str) -> str:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: str, b: str, where: str) -> str:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if _FULL not in (ra, rb) and self.size[ra] != self.size[rb]:
            raise UnsupportedModelError(f"structure='channel': {where} adds {self.size[ra]} to {self.size[rb]} "
                                        "channels; accepted: adds of equal channel counts")
        if rb == _FULL or (ra != _FULL and self.order.index(rb) < self.order.index(ra)):
            ra, rb = rb, ra
        self.parent[rb] = ra  # the full root, else the earlier set, names the class
        return ra


def plan_channels(model: nn.Module, example_input: torch.Tensor) -> ChannelPlan:
    """The channel sets of `model` and the gathers that follow them.

    Args:
        model: made of supported layers (README); residual adds written as `a + b`. Not modified.
        example_input: (N, *input_shape) float32.
    Returns:
        ChannelPlan.
    Raises:
        UnsupportedModelError: a layer or function the channel structure cannot follow (grouped
            but not depthwise convolutions, a layer with weights called twice, anything but `+` between
            layers), or an add of tensors with different channel counts.
    """
    model = copy.deepcopy(model).eval()  # the shape pass runs a forward: BatchNorm statistics must not move
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:
        raise UnsupportedModelError(f"structure='channel' needs a model torch.fx can trace: {e}") from None
    ShapeProp(gm).propagate(example_input[:2].clone())
    modules = dict(gm.named_modules())
    sets = _Sets()
    value: dict[str, tuple[str, int]] = {}  # fx node name -> (set id, columns per channel after Flatten)
    rules: dict[str, tuple[str | None, str | None, int]] = {}
    called: set[str] = set()

    def rule(name: str, rows, cols=None, repeat: int = 1):
        rules[name] = (rows, cols, repeat)

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            value[node.name] = (_FULL, 1)
        elif node.op == "output":
            out = node.args[0]
            sets.union(value[out.name][0], _FULL, "the model output")
        elif node.op == "call_module":
            path, m = node.target, modules[node.target]
            if path in called:
                raise UnsupportedModelError(f"structure='channel': layer {path!r} is called twice; accepted: "
                                            "each layer with parameters or statistics called once")
            if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
                called.add(path)
            src, repeat = value[node.args[0].name]
            prefix = f"{path}."
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if repeat != 1 and isinstance(m, nn.Conv2d):
                    raise UnsupportedModelError(f"layer {path!r}: a Conv2d after Flatten")
                if is_depthwise(m):
                    if m.padding_mode != "zeros":
                        raise UnsupportedModelError(f"structure='channel': depthwise layer {path!r} pads with "
                                                    f"{m.padding_mode!r}; accepted: zeros")
                    out = src
                    rule(f"{prefix}weight", src)
                elif isinstance(m, nn.Conv2d) and m.groups != 1:
                    raise UnsupportedModelError(f"structure='channel': layer {path!r} is a grouped Conv2d "
                                                f"(groups={m.groups}); accepted: groups 1 or depthwise")
                else:
                    out = sets.new(path, m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
                    rule(f"{prefix}weight", out, src, repeat)
                if m.bias is not None:
                    rule(f"{prefix}bias", out)
                value[node.name] = (out, 1)
            elif isinstance(m, nn.BatchNorm2d):
                for t in ("weight", "bias", "running_mean", "running_var"):
                    rule(f"{prefix}{t}", src)
                value[node.name] = (src, 1)
            elif isinstance(m, nn.Flatten):
                shape = node.args[0].meta["tensor_meta"].shape
                if m.start_dim != 1 or len(shape) < 2:
                    raise UnsupportedModelError(f"structure='channel': layer {path!r} flattens from dim "
                                                f"{m.start_dim}; accepted: Flatten() from dim 1")
                value[node.name] = (src, repeat * math.prod(shape[2:]))
            elif isinstance(m, PASSTHROUGH):
                value[node.name] = (src, repeat)
            else:
                raise UnsupportedModelError(f"structure='channel': layer {path!r} is {type(m).__name__}; accepted: "
                                            "Conv2d, Linear, BatchNorm2d, Flatten, " +
                                            ", ".join(t.__name__ for t in PASSTHROUGH))
        elif node.op == "call_function" and node.target in ADDS and len(node.args) == 2 \
                and all(isinstance(a, fx.Node) for a in node.args):
            (a, ra), (b, rb) = (value[x.name] for x in node.args)
            if ra != 1 or rb != 1:
                raise UnsupportedModelError(f"structure='channel': {node.name} adds flattened tensors")
            value[node.name] = (sets.union(a, b, f"residual add {node.name!r}"), 1)
        else:
            raise UnsupportedModelError(f"structure='channel': {node.op} {node.target} ({node.name}) cannot follow "
                                        "channel sets; accepted: layers and residual adds `a + b`")

    def resolve(s):
        if s is None:
            return None
        root = sets.find(s)
        return None if root == _FULL else root

    tensors = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    gathers = {}
    for name, (rows, cols, repeat) in rules.items():
        if name not in tensors:  # a BatchNorm2d without affine parameters
            continue
        g = Gather(resolve(rows), resolve(cols), repeat if resolve(cols) else 1)
        if g.rows is not None or g.cols is not None:
            gathers[name] = g
    live = {s for g in gathers.values() for s in (g.rows, g.cols) if s is not None}
    return ChannelPlan({s: sets.size[s] for s in sets.order if s in live}, gathers)
