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

The optimizer's element-wise work (`optimizer_flops_per_element`, from the update
formulas of `edgecl.runtime.optim`) is counted per step, over the weight and bias of
each layer, scaled by the fraction of entries that are updated (the TDM mask and the
DGM gradient mask; 0 for a frozen layer). `training_run_flops` puts it together per
step, per epoch and per run under a `SparsityConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from .optim import OptimizerConfig, OptimizerKind

REQUIRED_FIELDS = ("weight", "macs_per_sample", "needs_input_grad")


@dataclasses.dataclass(frozen=True)
class LayerFlops:
    """FLOPs of one layer over all samples: forward, input-gradient and weight-gradient products,
    and the optimizer's element-wise update of the layer's weight and bias (0 unless counted)."""

    weight: str
    forward: float
    input_grad: float
    weight_grad: float
    optimizer: float = 0.0

    @property
    def backward(self) -> float:
        return self.input_grad + self.weight_grad

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.optimizer


@dataclasses.dataclass(frozen=True)
class FlopsBreakdown:
    """Result of `training_flops`: per layer (table order) and totals, in FLOPs (2 per MAC)."""

    layers: tuple[LayerFlops, ...]
    samples: int
    steps: int = 0  # optimizer steps counted in `optimizer` (0: none counted)

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
    def optimizer(self) -> float:
        return sum(layer.optimizer for layer in self.layers)

    @property
    def backward(self) -> float:
        return self.input_grad + self.weight_grad

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.optimizer

    def to_dict(self) -> dict:
        return {"samples": self.samples, "steps": self.steps, "forward": self.forward, "input_grad": self.input_grad,
                "weight_grad": self.weight_grad, "optimizer": self.optimizer, "total": self.total,
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


# --- optimizer work and whole runs ------------------------------------------------------


def optimizer_flops_per_element(optimizer: OptimizerConfig) -> int:
    """Element-wise FLOPs of one optimizer update of one parameter entry.

    Counted from the formulas of `NumpyOptimizer.step` (torch's): SGD `w -= lr * g` is 2;
    weight decay adds 2 (`g + wd * w`), momentum 3 (`buf * m + (1 - d) * g`), Nesterov 2
    more. AdamW is 13 (two moment updates 7, `sqrt(v) / c + eps` 3, `m / denom`, scale,
    subtract 3) plus 1 for decoupled weight decay. Scalar bias corrections are per tensor,
    not per entry, and are not counted.
    """
    c = optimizer
    if c.kind is OptimizerKind.SGD:
        return 2 + (2 if c.weight_decay else 0) + (3 if c.momentum else 0) + (2 if c.nesterov else 0)
    return 13 + (1 if c.weight_decay else 0)


def _fraction(name: str, value, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
        raise ValueError(f"{name}={value!r}; accepted: a number in {'(0, 1]' if low_open else '[0, 1]'}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """What a training step skips, SparCL-style. Defaults: dense, nothing frozen.

    Attributes:
        weight_sparsity: fraction of each sparse layer's weights masked to 0 (TDM), in [0, 1).
        grad_density: fraction of each sparse layer's weight gradient kept (DGM), in [0, 1].
        data_removal: fraction of the stream examples not trained on (DDR), averaged over
            the run, in [0, 1).
        frozen: weight names (layer-table "weight") of layers that do not train.
        dense_first_last: keep the first and last layer dense (SparCL's default): sparsity
            and gradient density apply to the layers in between only.
    Raises:
        ValueError: a number out of range, a frozen entry that is not a string.
    """

    weight_sparsity: float = 0.0
    grad_density: float = 1.0
    data_removal: float = 0.0
    frozen: tuple[str, ...] = ()
    dense_first_last: bool = True

    def __post_init__(self):
        for name in ("weight_sparsity", "data_removal"):
            if _fraction(name, getattr(self, name)) >= 1.0:
                raise ValueError(f"{name}={getattr(self, name)!r}; accepted: a number in [0, 1)")
        _fraction("grad_density", self.grad_density)
        if isinstance(self.frozen, str) or not all(isinstance(n, str) for n in self.frozen):
            raise ValueError(f"frozen={self.frozen!r}; accepted: a sequence of weight names")
        object.__setattr__(self, "frozen", tuple(self.frozen))

    def sparse_names(self, layers: Sequence[Mapping]) -> list[str]:
        """Weights the sparsity and gradient density apply to (all, or all but the first and last)."""
        names = _check_layers(layers)
        ends = {names[0], names[-1]} if self.dense_first_last else set()
        return [n for n in dict.fromkeys(names) if n not in ends]

    def densities(self, layers: Sequence[Mapping]) -> tuple[dict[str, float], dict[str, float]]:
        """(weight_density, grad_density) per sparse weight name, as `training_flops` takes them.

        A weight-gradient entry is work only where the weight is active and DGM keeps it (a
        masked weight's gradient is exactly 0), so the gradient density is
        min(1 - weight_sparsity, grad_density), as the learner counts before its first DGM mask.
        """
        sparse = self.sparse_names(layers)
        active = 1.0 - self.weight_sparsity
        return {n: active for n in sparse}, {n: min(active, self.grad_density) for n in sparse}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["frozen"] = list(self.frozen)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> SparsityConfig:
        return cls(**d)


def optimizer_flops(layers: Sequence[Mapping], steps: int, optimizer: OptimizerConfig,
                    update_density: Mapping[str, float] | None = None, frozen=frozenset()) -> dict[str, float]:
    """Optimizer FLOPs of `steps` updates per weight name: (weight entries * density + bias entries) * per-element.

    Args:
        layers: layer-table rows with "weight", "weight_shape" and "bias" (None or a name).
        steps: optimizer steps, >= 0.
        optimizer: the optimizer whose per-entry cost counts (`optimizer_flops_per_element`).
        update_density: weight name -> fraction of its entries updated (missing: 1); biases stay dense.
        frozen: weight names whose layer (weight and bias) is not updated.
    Returns:
        weight name -> FLOPs; a weight that appears in two rows (shared) is counted once, at its first row.
    Raises:
        KeyError: a row without "weight_shape".
    """
    names = _check_layers(layers)
    density = _check_densities("update_density", update_density, names)
    per = optimizer_flops_per_element(optimizer)
    out: dict[str, float] = {}
    for i, layer in enumerate(layers):
        name = layer["weight"]
        if name in out:
            continue
        if "weight_shape" not in layer:
            raise KeyError(f"layers[{i}] lacks ['weight_shape']; the optimizer count needs parameter sizes")
        weights = math.prod(layer["weight_shape"])
        biases = layer["weight_shape"][0] if layer.get("bias") else 0
        entries = 0.0 if name in frozen else weights * density.get(name, 1.0) + biases
        out[name] = float(per * entries * steps)
    return out


@dataclasses.dataclass(frozen=True)
class TrainingFlops:
    """Result of `training_run_flops`: the same breakdown per step, per epoch and per run, in FLOPs.

    `step` is one full step (batch + replay samples, one optimizer update); `epoch` and `run`
    count the steps DDR leaves (the last batch of an epoch may be short).
    """

    sparsity: SparsityConfig
    optimizer: str
    batch: int
    replay: int
    examples_per_epoch: int
    epochs: int
    tasks: int
    steps_per_epoch: int
    step: FlopsBreakdown
    epoch: FlopsBreakdown
    run: FlopsBreakdown

    def to_dict(self) -> dict:
        return {"sparsity": self.sparsity.to_dict(), "optimizer": self.optimizer, "batch": self.batch,
                "replay": self.replay, "examples_per_epoch": self.examples_per_epoch, "epochs": self.epochs,
                "tasks": self.tasks, "steps_per_epoch": self.steps_per_epoch, "step": self.step.to_dict(),
                "epoch": self.epoch.to_dict(), "run": self.run.to_dict()}


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}; accepted: an integer >= {minimum}")
    return value


def training_run_flops(layers: Sequence[Mapping], sparsity: SparsityConfig = SparsityConfig(), batch: int = 32,
                       replay: int = 0, examples_per_epoch: int = 12_000, epochs: int = 1, tasks: int = 1,
                       optimizer: OptimizerConfig = OptimizerConfig(),
                       computed_density: Mapping[str, float] | None = None) -> TrainingFlops:
    """Training FLOPs per step, per epoch and per run, per layer and phase, under `sparsity`.

    Args:
        layers: the layer table (manifest.extra["layers"]), rows with "weight_shape" and "bias" too.
        sparsity: weight sparsity, gradient density, data removal, frozen layers.
        batch: stream examples per step. replay: buffer examples added to each step (ER: the
            replay batch; DER++: twice it).
        examples_per_epoch: stream examples of one epoch before DDR. epochs: per task. tasks: >= 1.
        optimizer: counts its element-wise update per step.
        computed_density: weight name -> share of its products a channel-structured graph computes
            (`edgecl.runtime.channel_sparcl.computed_densities`; missing: 1), as the learner counts
            it: forward, input- and weight-gradient products and the updated entries all scale by
            it. It takes the place of the unstructured weight sparsity and gradient density.
    Returns:
        TrainingFlops (forward, input-grad, weight-grad, optimizer per layer, in FLOPs).
    Raises:
        ValueError: a count below its minimum, a computed density outside [0, 1] or given with a
            weight sparsity or gradient density; KeyError: a table row without a needed field or
            a computed density of no layer.
    """
    _positive_int("batch", batch)
    _positive_int("replay", replay, 0)
    _positive_int("examples_per_epoch", examples_per_epoch)
    _positive_int("epochs", epochs)
    _positive_int("tasks", tasks)
    if not isinstance(sparsity, SparsityConfig):
        raise ValueError(f"sparsity={sparsity!r}; accepted: a SparsityConfig")
    wd, gd = sparsity.densities(layers)
    if computed_density is not None:
        if sparsity.weight_sparsity or sparsity.grad_density != 1.0:
            raise ValueError(f"computed_density with weight_sparsity={sparsity.weight_sparsity!r}, grad_density="
                             f"{sparsity.grad_density!r}: a channel-structured graph's work is its active channels "
                             "(DGM there saves no product); accepted: one or the other")
        wd = gd = _check_densities("computed_density", computed_density, _check_layers(layers))
    frozen = set(sparsity.frozen)
    update = gd  # the entries updated are those with a gradient: active and kept by DGM
    kept = round(examples_per_epoch * (1.0 - sparsity.data_removal))
    steps_per_epoch = math.ceil(kept / batch)

    def breakdown(samples: int, steps: int) -> FlopsBreakdown:
        products = training_flops(layers, samples, wd, gd, frozen)
        opt = optimizer_flops(layers, steps, optimizer, update, frozen)
        seen: set[str] = set()
        rows = []
        for row in products.layers:
            rows.append(dataclasses.replace(row, optimizer=0.0 if row.weight in seen else opt[row.weight]))
            seen.add(row.weight)
        return FlopsBreakdown(tuple(rows), samples, steps)

    epoch_samples = kept + replay * steps_per_epoch
    return TrainingFlops(sparsity, optimizer.kind.value, batch, replay, examples_per_epoch, epochs, tasks,
                         steps_per_epoch, breakdown(batch + replay, 1), breakdown(epoch_samples, steps_per_epoch),
                         breakdown(epoch_samples * epochs * tasks, steps_per_epoch * epochs * tasks))
