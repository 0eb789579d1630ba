"""`bench flops`: training FLOPs per step, epoch and run of a model, per layer and phase, optionally
with the projected (roofline) latency of a device profile next to them.

The layer table comes from a model family or the user's FILE.py:FUNCTION (built with torch
on the host) or from an exported artifact folder's manifest (no torch needed); the counting is
`edgecl.runtime.flops.training_run_flops`, the projection `edgecl.devices.roofline`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path

from edgecl.devices.profiles import DeviceProfile
from edgecl.devices.roofline import RooflineProjection, project_latency
from edgecl.runtime.flops import SparsityConfig, TrainingFlops, training_run_flops
from edgecl.runtime.optim import OptimizerConfig

PHASES = ("forward", "input_grad", "weight_grad", "optimizer")
SCOPES = ("step", "epoch", "run")


@dataclasses.dataclass(frozen=True)
class FlopsReport:
    """Result of `flops_report`: the counts, where the table came from, and an optional projection.

    `projection` is the roofline time of one step on `projection.device`; its source is
    always "projected" and it is shown apart from anything measured.
    """

    model: str
    input_shape: tuple[int, ...]
    layers: tuple[dict, ...]
    flops: TrainingFlops
    projection: RooflineProjection | None = None

    def to_dict(self) -> dict:
        return {"model": self.model, "input_shape": list(self.input_shape), "flops": self.flops.to_dict(),
                "projected_step_latency": None if self.projection is None else self.projection.to_dict()}


def model_layer_table(model: str, input_shape, num_classes: int = 10) -> list[dict]:
    """The exporter's layer table of a model family or FILE.py:FUNCTION at `input_shape` (builds it with torch).

    Raises:
        ValueError: as `edgecl.bench.subject.resolve_subject` and `build_net`.
    """
    import torch

    from edgecl.exporters.layers import layer_table

    from .subject import build_net, resolve_subject

    subject = resolve_subject(model, input_shape, num_classes)
    return layer_table(build_net(subject, seed=0), torch.zeros(2, *subject.input_shape))


def artifact_layer_table(folder: str | Path) -> tuple[str, tuple[int, ...], list[dict]]:
    """(model name, input shape, layer table) from an exported artifact folder's manifest.

    Raises:
        ValueError: the manifest has no layer table (exported before it existed).
    """
    from edgecl.runtime.manifest import load_manifest

    manifest = load_manifest(folder, verify=False)
    layers = manifest.extra.get("layers")
    if not layers:
        raise ValueError(f"{str(folder)!r}: manifest.extra has no 'layers'; re-export with this edgecl")
    return Path(folder).name, tuple(manifest.input_shape), layers


def flops_report(model: str = "cnn", input_shape=(1, 28, 28), artifacts: str | Path | None = None,
                 sparsity: SparsityConfig = SparsityConfig(), batch: int = 32, replay: int = 0,
                 examples_per_epoch: int = 12_000, epochs: int = 1, tasks: int = 1,
                 optimizer: OptimizerConfig = OptimizerConfig(), device: DeviceProfile | None = None,
                 num_classes: int = 10) -> FlopsReport:
    """Count training FLOPs of `model` (or of the exported `artifacts`) and project one step on `device`.

    Args:
        model, input_shape, num_classes: a model family of `edgecl.exporters.models` or FILE.py:FUNCTION
            (a function returning an nn.Module, called with no arguments), its input (C, H, W) and
            logits width; ignored when `artifacts` is given.
        artifacts: an exported folder; its manifest's layer table is used (no torch needed).
        sparsity, batch, replay, examples_per_epoch, epochs, tasks, optimizer: as
            `edgecl.runtime.flops.training_run_flops` takes them.
        device: a profile to project one step's latency on (labelled "projected").
    Returns:
        FlopsReport.
    Raises:
        ValueError: an unknown model or model file, a bad shape or count, an artifact folder without a
            layer table.
        KeyError: a frozen name that is not a layer weight (the accepted names listed).
    """
    if artifacts is not None:
        model, input_shape, layers = artifact_layer_table(artifacts)
    else:
        layers = model_layer_table(model, input_shape, num_classes)
        input_shape = tuple(input_shape)
    flops = training_run_flops(layers, sparsity, batch, replay, examples_per_epoch, epochs, tasks, optimizer)
    projection = None if device is None else project_latency(layers, flops.step, device, optimizer)
    return FlopsReport(model, tuple(input_shape), tuple(layers), flops, projection)


def _m(x: float) -> str:
    return f"{x / 1e6:.3f}"


def format_table(report: FlopsReport) -> str:
    """Per-layer MFLOPs of one step, then totals per step / epoch / run (and the projection, labelled)."""
    f, proj = report.flops, report.projection
    s = f.sparsity
    lines = [f"{report.model} {'x'.join(map(str, report.input_shape))}: batch {f.batch} + replay {f.replay}, "
             f"{f.steps_per_epoch} steps/epoch, {f.epochs} epoch(s) x {f.tasks} task(s), optimizer {f.optimizer}",
             f"weight sparsity {s.weight_sparsity:g}, grad density {s.grad_density:g}, data removal "
             f"{s.data_removal:g}, frozen {list(s.frozen) or 'none'}, dense first/last {s.dense_first_last}",
             "", "MFLOP of one step per layer:"]
    heads = ["layer", "forward", "input-grad", "weight-grad", "optimizer", "total"]
    if proj is not None:
        heads.append(f"ms PROJECTED ({proj.device})")
    rows = []
    for i, row in enumerate(f.step.layers):
        cells = [row.weight, *(_m(getattr(row, p)) for p in PHASES), _m(row.total)]
        if proj is not None:
            cells.append(f"{proj.layers[i].total_ms:.3f}")
        rows.append(cells)
    total = ["total", *(_m(getattr(f.step, p)) for p in PHASES), _m(f.step.total)]
    if proj is not None:
        total.append(f"{proj.total_ms:.3f}")
    rows.append(total)
    widths = [max(len(r[i]) for r in [heads, *rows]) for i in range(len(heads))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines += [fmt(heads), "  ".join("-" * w for w in widths), *map(fmt, rows), "", "GFLOP totals:"]
    for scope in SCOPES:
        b = getattr(f, scope)
        lines.append(f"  per {scope:<5} {b.total / 1e9:12.4f}  (forward {b.forward / 1e9:.4f}, input-grad "
                     f"{b.input_grad / 1e9:.4f}, weight-grad {b.weight_grad / 1e9:.4f}, optimizer "
                     f"{b.optimizer / 1e9:.4f}; {b.samples} samples, {b.steps} steps)")
    if proj is not None:
        lines += ["", f"PROJECTED (roofline, not measured) on {proj.device}: {proj.per_step_ms:.3f} ms per step "
                      f"({proj.peak_gflops:g} GFLOP/s, {proj.bandwidth_gbps:g} GB/s; Conv2d/Linear work only, "
                      f"a lower bound)"]
    return "\n".join(lines)


def to_csv(report: FlopsReport) -> str:
    """One row per scope and layer: FLOPs per phase; projected_ms (one step only) when a device was given."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["scope", "layer", *PHASES, "total", "samples", "steps", "projected_ms", "projected_device"])
    proj = report.projection
    for scope in SCOPES:
        b = getattr(report.flops, scope)
        for i, row in enumerate(b.layers):
            projected = ("", "")
            if proj is not None and scope == "step":
                projected = (f"{proj.layers[i].total_ms:.6g}", proj.device)
            w.writerow([scope, row.weight, *(f"{getattr(row, p):.6g}" for p in PHASES), f"{row.total:.6g}",
                        b.samples, b.steps, *projected])
    return out.getvalue()
