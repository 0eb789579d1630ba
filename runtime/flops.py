"""Training FLOPs counted the SparCL way: sparsity-aware, per Conv2d/Linear layer.

The layer table comes from the manifest (`manifest.extra["layers"]`, written by
`edgecl.exporters.layers.layer_table`). For one sample and one layer with
M multiply-accumulates in the dense forward pass (the convention of Evci et al.,
"Rigging the Lottery", ICML 2020, which SparCL follows for its training FLOPs: the
backward pass is two products of forward size, each as sparse as its operand):

- forward:       2 M * weight_density
- input-gradient: 2 M * weight_density (none where the layer's input depends on no
                  parameter, e.g. the first layer: nothing upstream needs it)
- weight-gradient: 2 M * grad_density (DGM), 0 for a frozen layer

times the number of samples that actually went through the step (after DDR removed
data; replayed buffer samples count as samples). Only Conv2d/Linear products are
counted, as torch.utils.flop_counter does: element-wise ops, BatchNorm and pooling
are a few percent of a CNN's work and no sparse kernel changes them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

REQUIRED_FIELDS = ("weight", "macs_per_sample", "needs_input_grad")


@dataclasses.dataclass(frozen=True)
class LayerFlops:
    """FLOPs of one layer over all samples: forward, input-gradient and weight-gradient products."""

    weight: str
    forward: float
    input_grad: float
    weight_grad: float

    @property
    def backward(self) -> float:
        return self.input_grad + self.weight_grad

    @property
    def total(self) -> float:
        return self.forward + self.backward


@dataclasses.dataclass(frozen=True)
class FlopsBreakdown:
    """Result of `training_flops`: per layer (table order) and totals, in FLOPs (2 per MAC)."""

    layers: tuple[LayerFlops, ...]
    samples: int

    @property
    def forward(self) -> float:
        return sum(layer.forward for layer in self.layers)

    @property
    def input_grad(self) -> float:
        return sum(layer.input_grad for layer in self.layers)

    @property
    def weight_grad(self) -> float:
        return sum(layer.weight_grad for layer in self.layers)

    @property
    def backward(self) -> float:
        return self.input_grad + self.weight_grad

    @property
    def total(self) -> float:
        return self.forward + self.backward

    def to_dict(self) -> dict:
        return {"samples": self.samples, "forward": self.forward, "input_grad": self.input_grad,
                "weight_grad": self.weight_grad, "total": self.total,
                "layers": [dataclasses.asdict(layer) for layer in self.layers]}


def _check_layers(layers: Sequence[Mapping]) -> list[str]:
    if isinstance(layers, (str, bytes, Mapping)) or not len(layers):
        raise ValueError(f"layers is {type(layers).__name__} of length {len(layers) if hasattr(layers, '__len__') else '?'}; "
                         f"accepted: a non-empty list of layer dicts (manifest.extra['layers'])")
    for i, layer in enumerate(layers):
        missing = [f for f in REQUIRED_FIELDS if f not in layer]
        if missing:
            raise KeyError(f"layers[{i}] lacks {missing}; accepted: dicts with {', '.join(REQUIRED_FIELDS)}")
        macs = layer["macs_per_sample"]
        if not isinstance(macs, (int, float)) or isinstance(macs, bool) or macs < 0:
            raise ValueError(f"layers[{i}]['macs_per_sample'] = {macs!r}; accepted: a number >= 0")
    return [layer["weight"] for layer in layers]


def _check_densities(kind: str, densities: Mapping[str, float] | None, names: list[str]) -> dict[str, float]:
    densities = dict(densities or {})
    unknown = set(densities) - set(names)
    if unknown:
        raise KeyError(f"{kind} names {sorted(unknown)} are not layer weights; accepted: {', '.join(names)}")
    for name, d in densities.items():
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
            raise ValueError(f"{kind}[{name!r}] = {d!r}; accepted: a number in [0, 1]")
    return densities


def training_flops(layers: Sequence[Mapping], samples: int, weight_density: Mapping[str, float] | None = None,
                   grad_density: Mapping[str, float] | None = None, frozen=frozenset()) -> FlopsBreakdown:
    """Sparsity-aware training FLOPs of `samples` forward+backward passes.

    Args:
        layers: the layer table, dicts with "weight" (parameter name), "macs_per_sample"
            (dense forward MACs of one sample) and "needs_input_grad" (bool).
        samples: number of samples trained on (after DDR; summed over steps), >= 0.
        weight_density: weight name -> fraction of the weight kept by its TDM mask
            (missing names: 1, dense).
        grad_density: weight name -> fraction of its gradient kept by DGM (missing: 1).
        frozen: weight names that do not train (no weight-gradient).
    Returns:
        FlopsBreakdown with one LayerFlops per table row, in FLOPs (2 per MAC).
    Raises:
        KeyError: a name that is not a weight of the table, a row missing a field.
        ValueError: densities outside [0, 1], negative samples or MACs, empty table.
    """
    names = _check_layers(layers)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(f"samples={samples!r}; accepted: an integer >= 0")
    wd = _check_densities("weight_density", weight_density, names)
    gd = _check_densities("grad_density", grad_density, names)
    frozen = set(frozen)
    unknown = frozen - set(names)
    if unknown:
        raise KeyError(f"frozen names {sorted(unknown)} are not layer weights; accepted: {', '.join(names)}")
    rows = []
    for layer in layers:
        name = layer["weight"]
        dense = 2.0 * layer["macs_per_sample"] * samples
        forward = dense * wd.get(name, 1.0)
        input_grad = forward if layer["needs_input_grad"] else 0.0
        weight_grad = 0.0 if name in frozen else dense * gd.get(name, 1.0)
        rows.append(LayerFlops(name, forward, input_grad, weight_grad))
    return FlopsBreakdown(tuple(rows), samples)


def dense_training_flops(layers: Sequence[Mapping], samples: int, frozen=frozenset()) -> FlopsBreakdown:
    """`training_flops` with every weight and gradient dense: the baseline SparCL's savings are measured against."""
    return training_flops(layers, samples, frozen=frozen)
