"""Projected training-step latency of a device from FLOPs and bytes moved: a per-layer roofline.

For each Conv2d/Linear layer and each phase (forward, input-gradient, weight-gradient,
optimizer) the projected time is max(FLOPs / peak, bytes / bandwidth) (Williams, Waterman
and Patterson, "Roofline", CACM 2009), summed over layers and phases. Bytes moved are
float32 tensors read or written once per phase, taken from the layer table:

- forward:         weights (+ bias) once per step, the input and output of every sample;
- input-gradient:  weights once per step, every sample's output gradient and input gradient;
- weight-gradient: every sample's input and output gradient, the weight (+ bias) gradient once per step;
- optimizer:       per step, weight (+ bias), its gradient, the new weight and each state slot
                   read and written (SGD 0 slots, momentum 1, AdamW 2).

This is a lower bound on time: caches are taken as perfect within a phase, element-wise
ops (BatchNorm, activations, pooling) and framework overhead are left out, and FLOPs are
those given (a sparse count assumes kernels that skip zeros, which the engines here do
not; bytes are always those of dense float32 arrays, as the engines store them). The
result is labelled "projected" and can never be labelled otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from edgecl.runtime.flops import FlopsBreakdown
from edgecl.runtime.optim import OptimizerConfig, OptimizerKind

from .profiles import DeviceProfile

PHASES = ("forward", "input_grad", "weight_grad", "optimizer")
FLOAT32_BYTES = 4
PROJECTED = "projected"


@dataclasses.dataclass(frozen=True)
class PhaseTime:
    """One phase of one layer: work, traffic, projected time in ms and which roof bounds it."""

    flops: float
    bytes: float
    ms: float
    bound: str  # "compute", "memory" or "none" (no work)


@dataclasses.dataclass(frozen=True)
class LayerProjection:
    weight: str
    forward: PhaseTime
    input_grad: PhaseTime
    weight_grad: PhaseTime
    optimizer: PhaseTime

    @property
    def total_ms(self) -> float:
        return sum(getattr(self, p).ms for p in PHASES)


@dataclasses.dataclass(frozen=True)
class RooflineProjection:
    """Result of `project_latency`: per-layer, per-phase projected times for one device.

    `source` is always "projected": a projection is never a measurement.

    Raises:
        ValueError: source is anything but "projected".
    """

    device: str
    peak_gflops: float
    bandwidth_gbps: float
    samples: int
    steps: int
    layers: tuple[LayerProjection, ...]
    source: str = PROJECTED

    def __post_init__(self):
        if self.source != PROJECTED:
            raise ValueError(f"source={self.source!r}; accepted: {PROJECTED!r} (a roofline is never a measurement)")

    @property
    def total_ms(self) -> float:
        return sum(layer.total_ms for layer in self.layers)

    @property
    def per_step_ms(self) -> float:
        return self.total_ms / self.steps

    def phase_ms(self, phase: str) -> float:
        if phase not in PHASES:
            raise ValueError(f"phase={phase!r}; accepted: {', '.join(PHASES)}")
        return sum(getattr(layer, phase).ms for layer in self.layers)

    def to_dict(self) -> dict:
        return {"source": self.source, "device": self.device, "peak_gflops": self.peak_gflops,
                "bandwidth_gbps": self.bandwidth_gbps, "samples": self.samples, "steps": self.steps,
                "total_ms": self.total_ms, "per_step_ms": self.per_step_ms,
                "phase_ms": {p: self.phase_ms(p) for p in PHASES},
                "layers": [{"weight": layer.weight, "total_ms": layer.total_ms,
                            **{p: dataclasses.asdict(getattr(layer, p)) for p in PHASES}} for layer in self.layers]}


def optimizer_state_slots(optimizer: OptimizerConfig) -> int:
    """Arrays the optimizer keeps per parameter: SGD 0, SGD with momentum 1, AdamW 2."""
    if optimizer.kind is OptimizerKind.SGD:
        return 1 if optimizer.momentum else 0
    return 2


def _phase(flops: float, nbytes: float, peak_flops_s: float, bytes_s: float) -> PhaseTime:
    if flops == 0 and nbytes == 0:
        return PhaseTime(0.0, 0.0, 0.0, "none")
    compute, memory = flops / peak_flops_s, nbytes / bytes_s
    return PhaseTime(float(flops), float(nbytes), 1000.0 * max(compute, memory),
                     "compute" if compute >= memory else "memory")


def layer_bytes(layer: Mapping, samples: int, steps: int, slots: int) -> dict[str, float]:
    """Bytes each phase of one layer moves over `samples` samples and `steps` steps (all phases run).

    Raises:
        KeyError: a row without weight_shape, in_elements or out_elements.
    """
    missing = [k for k in ("weight_shape", "in_elements", "out_elements") if k not in layer]
    if missing:
        raise KeyError(f"layer {layer.get('weight', '?')!r} lacks {missing}; the roofline needs tensor sizes "
                       f"(re-export: the exporter's layer table holds them)")
    params = math.prod(layer["weight_shape"]) + (layer["weight_shape"][0] if layer.get("bias") else 0)
    io = samples * (layer["in_elements"] + layer["out_elements"])
    return {"forward": FLOAT32_BYTES * (steps * params + io),
            "input_grad": FLOAT32_BYTES * (steps * math.prod(layer["weight_shape"]) + io),
            "weight_grad": FLOAT32_BYTES * (io + steps * params),
            "optimizer": FLOAT32_BYTES * steps * params * (3 + 2 * slots)}


def project_latency(layers: Sequence[Mapping], flops: FlopsBreakdown, profile: DeviceProfile,
                    optimizer: OptimizerConfig = OptimizerConfig()) -> RooflineProjection:
    """Project the time of the work in `flops` on `profile`'s device, layer by layer and phase by phase.

    Args:
        layers: the layer table the breakdown was computed from (same rows, same order).
        flops: a breakdown with steps >= 1 (from `training_run_flops`: its step, epoch or run).
        profile: the device; its peak_gflops and bandwidth_gbps are the two roofs.
        optimizer: sets the optimizer's state traffic.
    Returns:
        RooflineProjection, source "projected"; a phase with no FLOPs (first layer's input
        gradient, a frozen layer's weight gradient and update) moves no bytes either.
    Raises:
        ValueError: a breakdown with no steps or rows that do not match the table.
        KeyError: a table row without tensor sizes.
    """
    if not isinstance(flops, FlopsBreakdown) or flops.steps < 1:
        raise ValueError(f"flops has steps={getattr(flops, 'steps', None)!r}; accepted: a FlopsBreakdown with "
                         f"steps >= 1 (from edgecl.runtime.flops.training_run_flops)")
    if [row["weight"] for row in layers] != [row.weight for row in flops.layers]:
        raise ValueError("flops rows do not match the layer table (compute both from the same table)")
    if not isinstance(profile, DeviceProfile):
        raise ValueError(f"profile={profile!r}; accepted: a DeviceProfile")
    peak = profile.peak_gflops.value * 1e9
    bandwidth = profile.bandwidth_gbps.value * 1e9
    slots = optimizer_state_slots(optimizer)
    out = []
    for layer, row in zip(layers, flops.layers):
        nbytes = layer_bytes(layer, flops.samples, flops.steps, slots)
        out.append(LayerProjection(row.weight, *(
            _phase(getattr(row, p), nbytes[p] if getattr(row, p) > 0 else 0.0, peak, bandwidth) for p in PHASES)))
    return RooflineProjection(profile.name, profile.peak_gflops.value, profile.bandwidth_gbps.value, flops.samples,
                              flops.steps, tuple(out))
