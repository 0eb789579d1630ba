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

from edgecl.bench.channel_bench import (ChannelChoice, artifact_channel_plan, check_densities, file_choice,
                                        model_channel_plan, uniform_choice)
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
    always "projected" and it is shown apart from anything measured. `channels` is the narrowed
    work counted (`edgecl.bench.channel_bench.ChannelChoice`) and `computed` the share of each
    layer's dense products the channel-structured graph computes, or None and {} when dense.
    """

    model: str
    input_shape: tuple[int, ...]
    layers: tuple[dict, ...]
    flops: TrainingFlops
    projection: RooflineProjection | None = None
    channels: ChannelChoice | None = None
    computed: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        channels = None if self.channels is None else {**dataclasses.asdict(self.channels),
                                                       "computed_density": dict(self.computed)}
        return {"model": self.model, "input_shape": list(self.input_shape), "flops": self.flops.to_dict(),
                "projected_step_latency": None if self.projection is None else self.projection.to_dict(),
                "channels": channels}


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
                 num_classes: int = 10, channel_density: float | None = None,
                 channels: str | Path | None = None) -> FlopsReport:
    """Count training FLOPs of `model` (or of the exported `artifacts`) and project one step on `device`.

    Args:
        model, input_shape, num_classes: a model family of `edgecl.exporters.models` or FILE.py:FUNCTION
            (a function returning an nn.Module, called with no arguments), its input (C, H, W) and
            logits width; ignored when `artifacts` is given.
        artifacts: an exported folder; its manifest's layer table is used (no torch needed).
        sparsity, batch, replay, examples_per_epoch, epochs, tasks, optimizer: as
            `edgecl.runtime.flops.training_run_flops` takes them.
        device: a profile to project one step's latency on (labelled "projected").
        channel_density: count a channel-structured graph with this share in (0, 1] of every
            channel set active (`edgecl.bench.channel_bench`). channels: instead, a file of active
            channels (an engine state .npz or JSON {set: [indices]}). The plan is traced from the
            model on the host, or read from a channel-structured `artifacts` manifest.
    Returns:
        FlopsReport.
    Raises:
        ValueError: an unknown model or model file, a bad shape or count, an artifact folder without a
            layer table; a channel density outside (0, 1], with `channels`, or with a weight sparsity
            or gradient density; a bad channels file (`read_channels_file`); artifacts that are not
            channel-structured. UnsupportedModelError: a model that cannot be channel-structured.
        KeyError: a frozen name that is not a layer weight (the accepted names listed).
    """
    if channel_density is not None or channels is not None:
        return _channel_report(model, input_shape, artifacts, sparsity, batch, replay, examples_per_epoch, epochs,
                               tasks, optimizer, device, num_classes, channel_density, channels)
    if artifacts is not None:
        model, input_shape, layers = artifact_layer_table(artifacts)
    else:
        layers = model_layer_table(model, input_shape, num_classes)
        input_shape = tuple(input_shape)
    flops = training_run_flops(layers, sparsity, batch, replay, examples_per_epoch, epochs, tasks, optimizer)
    projection = None if device is None else project_latency(layers, flops.step, device, optimizer)
    return FlopsReport(model, tuple(input_shape), tuple(layers), flops, projection)


def _channel_report(model, input_shape, artifacts, sparsity, batch, replay, examples_per_epoch, epochs, tasks,
                    optimizer, device, num_classes, channel_density, channels) -> FlopsReport:
    """`flops_report` of a channel-structured graph: the products counted from the narrowed tensors."""
    if channel_density is not None:
        if channels is not None:
            raise ValueError(f"channel_density={channel_density!r} with channels={str(channels)!r}: both say which "
                             "channels are active; accepted: one or the other")
        (channel_density,) = check_densities((channel_density,), "channel_density")
    if sparsity.weight_sparsity or sparsity.grad_density != 1.0:
        raise ValueError(f"weight sparsity {sparsity.weight_sparsity:g} / grad density {sparsity.grad_density:g} "
                         "with channel densities: a channel-structured graph's work is its active channels (its "
                         "DGM saves no product); accepted: sparsity 0 and grad density 1 with them")
    if artifacts is not None:
        model, input_shape = artifact_layer_table(artifacts)[:2]
        plan = artifact_channel_plan(artifacts)
    else:
        from .subject import resolve_subject

        plan = model_channel_plan(resolve_subject(model, input_shape, num_classes))
    choice = uniform_choice(plan, channel_density) if channel_density is not None else file_choice(plan, channels)[0]
    computed = choice.computed(plan)
    flops = training_run_flops(plan.layers, sparsity, batch, replay, examples_per_epoch, epochs, tasks, optimizer,
                               computed)
    projection = None if device is None else project_latency(plan.layers, flops.step, device, optimizer)
    return FlopsReport(model, tuple(input_shape), tuple(plan.layers), flops, projection, choice, computed)


def _m(x: float) -> str:
    return f"{x / 1e6:.3f}"


def format_table(report: FlopsReport) -> str:
    """Per-layer MFLOPs of one step, then totals per step / epoch / run (and the projection, labelled)."""
    f, proj = report.flops, report.projection
    s = f.sparsity
    lines = [f"{report.model} {'x'.join(map(str, report.input_shape))}: batch {f.batch} + replay {f.replay}, "
             f"{f.steps_per_epoch} steps/epoch, {f.epochs} epoch(s) x {f.tasks} task(s), optimizer {f.optimizer}",
             f"weight sparsity {s.weight_sparsity:g}, grad density {s.grad_density:g}, data removal "
             f"{s.data_removal:g}, frozen {list(s.frozen) or 'none'}, dense first/last {s.dense_first_last}"]
    c = report.channels
    if c is not None:
        source = f"density {c.density:g} of every set" if c.file is None else f"from {c.file}"
        lines.append(f"channel-structured graph, active channels {source}: " + ", ".join(
            f"{name} {n}/{c.sets[name]}" for name, n in c.active.items()))
    lines += ["", "MFLOP of one step per layer:"]
    heads = ["layer", "forward", "input-grad", "weight-grad", "optimizer", "total"]
    if c is not None:
        heads.append("computed share")
    if proj is not None:
        heads.append(f"ms PROJECTED ({proj.device})")
    rows = []
    for i, row in enumerate(f.step.layers):
        cells = [row.weight, *(_m(getattr(row, p)) for p in PHASES), _m(row.total)]
        if c is not None:
            cells.append(f"{report.computed.get(row.weight, 1.0):.4f}")
        if proj is not None:
            cells.append(f"{proj.layers[i].total_ms:.3f}")
        rows.append(cells)
    total = ["total", *(_m(getattr(f.step, p)) for p in PHASES), _m(f.step.total)]
    if c is not None:
        total.append("")
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
