"""Channel densities in `bench flops` and `bench latency`: which channels, what they cost, how long a step takes.

A channel-structured export (`export(..., structure="channel")`) trains any subset of each
channel set's output channels. Before training, a user gives the narrowed work either as one
share of every set (`--channel-density D`, D in (0, 1]: max(1, round(D * n)) channels of a set of
n, as `ChannelMasks` keeps them) or as saved active channels (`--channels FILE`: an engine state
written by `Engine.save`, a checkpoint's `engine.npz`, or a JSON file {set: [indices]}).

- FLOPs (`bench flops`) are counted from the tensors the structured graph computes
  (`edgecl.runtime.channel_sparcl.computed_densities`): the plan comes from a model family /
  FILE.py:FUNCTION traced on the host (`edgecl.exporters.channel_plan.plan_channels`) or from an
  artifact folder's manifest (extra["channels"]).
- Step time (`bench latency`): one dense and one structured portable export of the same
  weights; one engine per density (its first channels the largest by sum |w|, as
  `ChannelMasks.initial` picks them) or per file; the engines take turns call by call
  (`interleaved_ms`), and each row gives its median against the dense graph's and the counted
  FLOPs against the dense count, so time and count describe the same work.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgecl.bench.latency_rows import LatencyResult, LatencyRow, interleaved_ms, summary_ms
from edgecl.runtime.channel_sparcl import active_counts, computed_densities
from edgecl.runtime.channels import check_channels
from edgecl.runtime.errors import UnsupportedModelError
from edgecl.runtime.flops import TrainingFlops, training_run_flops

FILE_ACCEPTED = ("accepted: an engine state .npz (Engine.save, a checkpoint's engine.npz) of a channel-structured "
                 "export of this model, or a .json file {set: [indices]}")
STRUCTURED_FOLDER = "portable-channel"  # next to bench's dense export in its cache folder


def check_densities(values, flag: str = "--channel-density") -> tuple[float, ...]:
    """Channel densities, each a number in (0, 1], at least one, none twice.

    Raises:
        ValueError: naming `flag`, the value and what is accepted.
    """
    sep = " " if flag.startswith("--") else "="  # a flag, or a config field
    values = tuple(values)
    for d in values:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d <= 1.0:
            raise ValueError(f"{flag}{sep}{d!r}; accepted: numbers in (0, 1], e.g. 1,0.75,0.5,0.25")
    if not values or len(set(values)) != len(values):
        raise ValueError(f"{flag}{sep}{list(values)}; accepted: one or more distinct numbers in (0, 1]")
    return tuple(float(d) for d in values)


def parse_densities(text: str) -> tuple[float, ...]:
    """'1,0.75,0.5' -> (1.0, 0.75, 0.5), checked as `check_densities`."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--channel-density {text!r}; accepted: numbers in (0, 1] joined by ',', "
                         "e.g. 1,0.75,0.5,0.25") from None
    return check_densities(values)


@dataclasses.dataclass(frozen=True)
class ChannelPlanTable:
    """What a count needs: the layer table, the channel sets (set -> channels) and the gathers
    (tensor name -> [rows set, columns set, repeat]), as a structured export's manifest holds them."""

    layers: list
    sets: dict
    gathers: dict


def model_channel_plan(subject, seed: int = 0) -> ChannelPlanTable:
    """The layer table and channel plan of a model family or FILE.py:FUNCTION (traced with torch on the host).

    Raises:
        UnsupportedModelError: the model cannot be channel-structured, or has no channel set (naming it).
        ValueError: as `edgecl.bench.subject.build_net`.
    """
    import torch

    from edgecl.exporters.channel_plan import plan_channels
    from edgecl.exporters.layers import layer_table

    from .subject import build_net

    net = build_net(subject, seed)
    example = torch.zeros(2, *subject.input_shape)
    try:
        plan = plan_channels(net, example)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"channel density for model {subject.model!r}: {e}") from None
    if not plan.sets:
        raise UnsupportedModelError(f"channel density for model {subject.model!r}: it has no channel set (every "
                                    "layer's outputs reach the model output); accepted: a model with a hidden "
                                    "Conv2d / Linear layer")
    return ChannelPlanTable(layer_table(net, example), dict(plan.sets),
                            {n: g.to_list() for n, g in plan.gathers.items()})


def artifact_channel_plan(folder) -> ChannelPlanTable:
    """The layer table and channel plan of a channel-structured export's manifest (no torch).

    Raises:
        ValueError: the export is not channel-structured, or has no layer table.
    """
    from edgecl.runtime.manifest import load_manifest

    extra = load_manifest(folder, verify=False).extra
    plan = extra.get("channels") or {}
    if not plan.get("sets"):
        raise ValueError(f"channel density with artifacts {str(folder)!r}: not a channel-structured export (its "
                         "manifest has no extra['channels'] sets); accepted: an export made with "
                         "export(..., structure='channel')")
    if not extra.get("layers"):
        raise ValueError(f"{str(folder)!r}: manifest.extra has no 'layers'; re-export with this edgecl")
    return ChannelPlanTable(extra["layers"], dict(plan["sets"]), {n: list(g) for n, g in plan["gathers"].items()})


def _npz_channels(path: Path, layers) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile, OSError, ValueError: all mean a bad file
        raise ValueError(f"--channels {str(path)!r} is unreadable ({type(e).__name__}: {e}); {FILE_ACCEPTED}") from None
    values = {k[len("channels::"):]: v for k, v in arrays.items() if k.startswith("channels::")}
    if not values:
        raise ValueError(f"--channels {str(path)!r} holds no channels::<set> arrays (not the state of a "
                         f"channel-structured engine); {FILE_ACCEPTED}")
    if any(k.startswith("param::") for k in arrays):  # an engine state: its weights say which model it is
        for row in layers:
            name, shape = row["weight"], tuple(row["weight_shape"])
            kept = arrays.get(f"param::{name}")
            if kept is None or tuple(kept.shape) != shape:
                what = "has no weight" if kept is None else f"has weight shape {tuple(kept.shape)} for"
                raise ValueError(f"--channels {str(path)!r} is the state of another model: it {what} {name!r} "
                                 f"(this model's is {shape}); {FILE_ACCEPTED}")
    return values


def _json_channels(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--channels {str(path)!r} is unreadable ({type(e).__name__}: {e}); {FILE_ACCEPTED}") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ValueError(f"--channels {str(path)!r} holds a {type(data).__name__} that is not {{set: [indices]}}; "
                         f"{FILE_ACCEPTED}")
    for name, v in data.items():
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
            raise ValueError(f"--channels {str(path)!r}: set {name!r} holds {v!r}; accepted: a list of integer "
                             "channel indices")
    return {name: np.asarray(v, np.int64) for name, v in data.items()}


def read_channels_file(path, plan: ChannelPlanTable) -> dict[str, np.ndarray]:
    """The active channels a file gives, checked against `plan` (sets it leaves out stay full).

    Raises:
        ValueError: not a file, an unreadable one, one of another model, an unknown set, indices out
            of range, unsorted or repeated (naming the file, the value and what is accepted).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--channels {str(path)!r} is not a file; {FILE_ACCEPTED}")
    if path.suffix == ".npz":
        values = _npz_channels(path, plan.layers)
    elif path.suffix == ".json":
        values = _json_channels(path)
    else:
        raise ValueError(f"--channels {str(path)!r} ends in {path.suffix!r}; {FILE_ACCEPTED}")
    try:
        return check_channels(values, plan.sets)
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"--channels {str(path)!r}: {e.args[0]}") from None


@dataclasses.dataclass(frozen=True)
class ChannelChoice:
    """One narrowed configuration: `density` (uniform) or `file`, and the active count of every set."""

    label: str
    density: float | None
    file: str | None
    active: dict  # set -> active channels
    sets: dict  # set -> channels

    def computed(self, plan: ChannelPlanTable) -> dict[str, float]:
        """Weight name -> share of its dense products the structured graph computes."""
        return computed_densities(plan.layers, plan.gathers, plan.sets, self.active)


def uniform_choice(plan: ChannelPlanTable, density: float) -> ChannelChoice:
    return ChannelChoice(f"channels {density:g}", density, None, active_counts(plan.sets, density), dict(plan.sets))


def file_choice(plan: ChannelPlanTable, path) -> tuple[ChannelChoice, dict[str, np.ndarray]]:
    chosen = read_channels_file(path, plan)
    active = {s: len(chosen[s]) if s in chosen else n for s, n in plan.sets.items()}
    return ChannelChoice(f"channels {Path(path).name}", None, str(path), active, dict(plan.sets)), chosen


def choice_flops(plan: ChannelPlanTable, choice: ChannelChoice, **run) -> TrainingFlops:
    """`training_run_flops` of the structured graph at `choice` (keyword arguments as it takes them)."""
    return training_run_flops(plan.layers, computed_density=choice.computed(plan), **run)


@dataclasses.dataclass(frozen=True)
class ChannelRow:
    """One structured engine and phase against the dense graph: medians in ms and counted FLOPs ratio."""

    graph: str
    phase: str
    density: float | None
    file: str | None
    active: dict
    median_ms: float
    iqr_ms: float
    ratio_to_dense: float
    flops_ratio: float  # counted FLOPs of the phase (training step: all of it; infer: forward) / dense


def _structured_export(prepared, net) -> Path:
    """The structured portable export next to bench's dense one (reused when it is there and intact)."""
    import torch

    from edgecl.exporters import export
    from edgecl.runtime import ArtifactError, load_manifest
    from edgecl.runtime.locks import folder_lock

    folder = Path(prepared.artifacts["portable"]).parent
    with folder_lock(folder, wait=True, what="bench cache folder"):
        try:
            kept = load_manifest(folder / STRUCTURED_FOLDER)
            if not kept.extra.get("channels", {}).get("sets") or tuple(kept.input_shape) != prepared.input_shape:
                raise ArtifactError("another export")
            return folder / STRUCTURED_FOLDER
        except ArtifactError:
            return export(net, torch.zeros(2, *prepared.input_shape), folder / STRUCTURED_FOLDER,
                          structure="channel").folder


def measure_channel_latency(config, cache_dir=None):
    """`bench latency` with channel densities: the dense portable step against the structured one per choice.

    Args:
        config: a LatencyConfig with `channel_density` and/or `channels` (checked there).
        cache_dir: as `measure_latency`.
    Returns:
        LatencyResult: the dense portable rows (`rows`) and one ChannelRow per choice and phase (`channels`).
    Raises:
        UnsupportedModelError: a model that cannot be channel-structured; ValueError: a bad channels
            file; both before anything is exported.
    """
    from edgecl.runtime import open_engine
    from edgecl.runtime.channel_sparcl import ChannelMasks

    from .fresh_process import prepare

    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # libgomp reads it once, when torch loads it
    policy = os.environ.get("OMP_WAIT_POLICY", "libgomp default (spinning)")
    subject = config.subject
    plan = model_channel_plan(subject, config.seed)  # the checks first: nothing is exported yet
    choices = [(uniform_choice(plan, d), None) for d in config.channel_density or ()]
    if config.channels is not None:
        choices.append(file_choice(plan, config.channels))
    dense_flops = training_run_flops(plan.layers, batch=config.batch, examples_per_epoch=config.batch).step
    with tempfile.TemporaryDirectory(prefix="edgecl-latency-") as tmp:
        prepared = prepare(subject, config.batch, ("portable",), cache_dir or tmp, config.seed)
        structured = _structured_export(prepared, prepared.torch_model)
        with np.load(prepared.batch_file) as z:
            x, y = z["x"], z["y"]
        engines = {"dense": open_engine(prepared.artifacts["portable"], threads=config.threads)}
        rng = np.random.default_rng(config.seed)
        for choice, chosen in choices:
            engine = open_engine(structured, threads=config.threads)
            if chosen is None:
                ChannelMasks(engine, choice.density).initial(rng)  # the largest channels by sum |w|
            else:
                engine.set_channels(chosen)
            engines[choice.label] = engine
        rows, channel_rows = [], []
        load_before = os.getloadavg()[0]
        for phase in config.phases:
            calls = {n: (lambda e=e: e.step(x, y)) if phase == "train" else (lambda e=e: e.evaluate(x))
                     for n, e in engines.items()}
            stats = {n: summary_ms(t) for n, t in interleaved_ms(calls, config.warmup, config.repeats).items()}
            dense_ms, dense_iqr = stats["dense"]
            rows.append(LatencyRow(subject.label, "portable", config.target, "measured", phase, dense_ms, dense_iqr,
                                   None))
            for choice, _ in choices:
                counted = choice_flops(plan, choice, batch=config.batch, examples_per_epoch=config.batch).step
                ratio = (counted.total / dense_flops.total if phase == "train"
                         else counted.forward / dense_flops.forward)
                med, iqr = stats[choice.label]
                channel_rows.append(ChannelRow(choice.label, phase, choice.density, choice.file, choice.active,
                                               med, iqr, med / dense_ms, ratio))
        load = (load_before, os.getloadavg()[0])
    return LatencyResult(config, tuple(rows), (), policy, channels=tuple(channel_rows), load_average=load)


def format_channel_rows(rows) -> list[str]:
    """The channel table of `bench latency`: per phase and choice, median, IQR, vs dense, counted FLOPs vs dense."""
    lines = [f"{'phase':<7}{'graph':<24}{'median ms':>11}{'IQR ms':>9}{'vs dense':>10}{'FLOPs vs dense':>16}"]
    for r in rows:
        lines.append(f"{r.phase:<7}{r.graph:<24}{r.median_ms:>11.3f}{r.iqr_ms:>9.3f}{r.ratio_to_dense:>9.3f}x"
                     f"{r.flops_ratio:>15.3f}x")
    return lines


def check_channel_config(config) -> None:
    """A LatencyConfig's channel densities checked, and the settings they cannot go with refused (before any work).

    Raises:
        ValueError: naming the field, its value and what is accepted.
    """
    given = "channel_density" if config.channel_density is not None else "channels"
    if config.channel_density is not None:
        object.__setattr__(config, "channel_density", check_densities(config.channel_density, "channel_density"))
    if config.artifacts is not None:
        raise ValueError(f"{given} with artifacts={config.artifacts!r}: the channel rows export the model twice "
                         "(dense and channel-structured, the same weights); accepted: model (a family or "
                         "FILE.py:FUNCTION) with channel_density / channels")
    if tuple(config.engines) != ("portable",):
        raise ValueError(f"engines={list(config.engines)} with {given}: only the portable engine runs a "
                         "channel-structured graph (ort-training's graph is fixed at export); accepted: "
                         "engines ['portable'] or none")
    if config.device is not None:
        raise ValueError(f"{given} with device={config.device!r}: the channel rows are measured on the host; "
                         "accepted: one or the other")
    if "cold_start" in config.phases:
        raise ValueError(f"phases={list(config.phases)} with {given}: cold starts are not timed per channel "
                         "choice; accepted: train and/or infer")

