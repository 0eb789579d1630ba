"""SparCL on whole output channels: TDM and DGM for a channel-structured export.

With `SparCLConfig(structure="channel")` the masks are not 0/1 tensors multiplied into dense
weights but the active channels of each channel set (`export(..., structure="channel")`,
`edgecl.runtime.channels`): the step graph computes on the narrower tensors, so the saving is
wall time, not only counted FLOPs. The same schedule as the unstructured mode (`sparcl`):

- TDM: a channel's importance is |w| + 0.5 |grad| summed over the weight rows that produce it
  (every Conv2d / Linear weight whose rows the set gathers: residual adds join several layers
  into one set; depthwise layers follow their input channels); the first active channels are
  the largest by sum |w|; each update keeps the most important, prunes the rest of the
  prune ratio and regrows random channels that were inactive, exactly as `prune_and_regrow`
  does for weight entries. A regrown channel resumes from its own weights, BatchNorm
  statistics and optimizer state (inactive entries never move).
- DGM: of each such weight gradient, the output channels (rows) of largest sum |grad| are
  kept, as many as hold `grad_density` of the full tensor's entries (the unstructured meaning
  of the density), at least one, at most the active ones.
- Every channel set is pruned to the density. The stem's input channels (the image) and the
  classifier's outputs (the classes) are never channel sets, so the first layer still sees
  every input channel and the last still scores every class: SparCL's dense-first-last rule
  on whole channels.

FLOPs (`computed_densities`) are counted from the tensors the graph computes: a layer's
products scale with its active output rows times its active input columns; a depthwise layer
runs at full width (ONNX's group count is fixed at export, see `edgecl.exporters.structured`)
and counts in full; DGM's kept rows save the optimizer's work but no product (the compact
weight gradient is computed whole), so they do not lower the count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .sparcl import DGM, initial_mask, keep_count, prune_and_regrow

STRUCTURES = ("weight", "channel")


def check_structured_engine(engine) -> dict[str, int]:
    """The engine's channel sets, or a ValueError saying which export channel-structured SparCL needs."""
    sets = getattr(engine, "channel_sets", None) or {}
    if not sets:
        raise ValueError(f"structure='channel' needs a channel-structured export (export(..., structure='channel'), "
                         f"portable engine); this {type(engine).__name__} has no channel sets; accepted: such an "
                         "export, or structure='weight'")
    return dict(sets)


def _rows_set(gathers: Mapping, name: str) -> str | None:
    g = gathers.get(name)
    return None if g is None else g[0]


class ChannelMasks:
    """Which channels of each set are active: first choice, TDM updates, and the densities they give.

    Args:
        engine: a portable engine of a channel-structured export. density: share of each set's
            channels kept, in (0, 1].
    """

    def __init__(self, engine, density: float):
        self.sets = check_structured_engine(engine)
        self.engine = engine
        self.density = float(density)
        plan = engine.manifest.extra["channels"]
        self.gathers = {n: tuple(g) for n, g in plan["gathers"].items()}
        self.layers = engine.manifest.extra.get("layers", [])
        weights = [row["weight"] for row in self.layers]
        trainable = set(engine.trainable_shapes)
        # the weights whose rows make each set's channels (their gradients score the channels)
        self.producers = {s: [w for w in weights if _rows_set(self.gathers, w) == s and w in trainable]
                          for s in self.sets}
        self.weights = sorted({w for ws in self.producers.values() for w in ws})

    def _scores(self, arrays: Mapping[str, np.ndarray], s: str) -> np.ndarray:
        total = np.zeros(self.sets[s], np.float64)
        for w in self.producers[s]:
            a = np.abs(arrays[w].astype(np.float64))
            total += a.reshape(a.shape[0], -1).sum(1)
        return total

    def _counts(self) -> dict[str, int]:
        return active_counts(self.sets, self.density)

    def initial(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The first active channels: the largest by sum |w| (ties at random), set on the engine."""
        params = self.engine.parameters()
        chosen = {}
        for s, n in self._counts().items():
            mask = initial_mask(self._scores(params, s), n / self.sets[s], rng)
            chosen[s] = np.flatnonzero(mask).astype(np.int64)
        self.engine.set_channels(chosen)
        return chosen

    def update(self, grads: Mapping[str, np.ndarray], prune_ratio: float, rng: np.random.Generator) -> None:
        """One TDM update of every set from the last step's gradients (full-size, 0 where inactive)."""
        params, active = self.engine.parameters(), self.engine.channels()
        chosen = {}
        for s, n in self._counts().items():
            mask = np.zeros(self.sets[s], np.float32)
            mask[active[s]] = 1.0
            if not self.producers[s]:  # nothing trains these channels: they stay
                chosen[s] = active[s]
                continue
            new = prune_and_regrow(self._scores(params, s), self._scores(grads, s), mask, n / self.sets[s],
                                   prune_ratio, rng)
            chosen[s] = np.flatnonzero(new).astype(np.int64)
        self.engine.set_channels(chosen)

    def computed_densities(self) -> dict[str, float]:
        """Weight name -> share of its dense products the structured graph computes (rows x columns)."""
        return computed_densities(self.layers, self.gathers, self.sets,
                                  {s: len(v) for s, v in self.engine.channels().items()})


def active_counts(sets: Mapping[str, int], density: float) -> dict[str, int]:
    """Channels of each set kept at `density`: round half up, at least one."""
    return {s: max(1, keep_count(n, density)) for s, n in sets.items()}


def computed_densities(layers, gathers: Mapping, sets: Mapping[str, int], active: Mapping[str, int]) -> dict[str, float]:
    """Per layer weight: (active rows / rows) x (active columns / columns) of what the graph computes;
    a depthwise layer (groups > 1, one input channel per group) counts whole: it runs at full width.

    Args:
        layers: the manifest's layer table. gathers: tensor name -> (rows set, columns set, repeat).
        sets: set -> channels. active: set -> active channel count.
    """
    out = {}
    for row in layers:
        name = row["weight"]
        g = gathers.get(name)
        if g is None or (row.get("groups", 1) > 1 and row["weight_shape"][1] == 1):
            out[name] = 1.0
            continue
        rows, cols = g[0], g[1]
        d = 1.0
        for s in (rows, cols):
            if s is not None:
                d *= active[s] / sets[s]
        out[name] = d
    return out


class ChannelDGM(DGM):
    """DGM on whole output channels: of each weight gradient, the rows of largest sum |grad|, as many
    as hold `density` of the full tensor's entries (at least one, at most the active ones)."""

    def __init__(self, density: float, every: int, names, gathers: Mapping, sets: Mapping[str, int], active):
        super().__init__(density, every, names)
        self.gathers, self.sets, self.active = gathers, sets, active  # active(): set -> active indices, now

    def _mask(self, name: str, g: np.ndarray) -> np.ndarray:
        rows_set, cols_set, _ = self.gathers[name]
        active = self.active()
        live = active[rows_set] if rows_set is not None else np.arange(g.shape[0])
        row_entries = g.size / g.shape[0]  # of a row, the active entries: its active columns only
        if cols_set is not None:
            row_entries *= len(active[cols_set]) / self.sets[cols_set]
        k = min(len(live), max(1, int(math.floor(self.density * g.size / row_entries + 0.5))))
        scores = np.abs(np.asarray(g, np.float64).reshape(g.shape[0], -1)[live]).sum(1)
        mask = np.zeros(g.shape, np.float32)
        mask[live[np.argsort(-scores, kind="stable")[:k]]] = 1.0  # among the active rows only
        return mask
