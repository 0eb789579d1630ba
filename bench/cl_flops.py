"""The FLOPs table of a `bench run` folder: training FLOPs per strategy, the ratio to dense DER++,
and the forward / input-gradient / weight-gradient split.

A run's JSON records its total training FLOPs (`train_flops`, SparCL's sparsity-aware
count) and the dense count of the same samples (`dense_train_flops`), not the split. The
split is rebuilt from the layer table in the folder's exported manifest: the samples
trained on are dense_train_flops / dense FLOPs per sample, and the sparse per-sample
split follows from the run's configuration (TDM masks hold each sparse layer at
1 - sparsity from the first step; a weight-gradient entry is work where the weight is
active and DGM keeps it, min(1 - sparsity, grad_density) of the tensor; the first and
last layer dense when the config says so), as `bench flops` counts. Runs whose recorded
count priced the weight gradient over masked-out weights too (at grad_density, or dense
without DGM: it differs when 1 - sparsity < grad_density) are recognised and marked
`legacy_counting`, with `current_total` the count with masked entries skipped. Runs whose
weight-gradient density was measured on the masks (below the nominal one where some active
weights get no gradient) keep forward and input-gradient work at the exact TDM densities and
the rest of the recorded total as weight-gradient work. Each row says how far the nominal
total is from the recorded one (`check`); where neither reading fits, the split is left out.
The optimizer's element-wise work (not part of `train_flops`) is shown apart, from the
run's step count.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from edgecl.runtime.flops import SparsityConfig, dense_training_flops, optimizer_flops, training_flops
from edgecl.runtime.optim import OptimizerConfig

SPLIT_TOLERANCE = 0.005


@dataclasses.dataclass(frozen=True)
class StrategyFlops:
    """Mean over seeds of one strategy's training FLOPs; split fields None where not rebuilt."""

    strategy: str
    label: str
    seeds: int
    sparsity: float
    train_flops: float
    ratio_to_reference: float | None
    forward: float | None
    input_grad: float | None
    weight_grad: float | None
    optimizer: float | None
    check: float | None  # (rebuilt total - recorded total) / recorded total
    legacy_counting: bool = False  # recorded with weight-gradient work over masked-out weights too
    current_total: float | None = None  # the same run, weight-gradient over active, DGM-kept entries only


def _layer_table(out_dir: Path) -> list[dict] | None:
    for manifest in sorted((out_dir / "artifacts").glob("*/manifest.json")):
        layers = json.loads(manifest.read_text()).get("extra", {}).get("layers")
        if layers:
            return layers
    return None


def _split(run: dict, layers: list[dict]) -> tuple | None:
    """(forward, input_grad, weight_grad, optimizer, check, legacy, current total) of one run, or None
    if the recorded total matches neither counting."""
    per_sample_dense = dense_training_flops(layers, 1).total
    samples = round(run["dense_train_flops"] / per_sample_dense)
    strategy = run["config"]["strategy"]
    sparcl = strategy.get("sparcl")
    if sparcl:
        cfg = SparsityConfig(sparcl["sparsity"], sparcl["grad_density"] if sparcl["dgm"] else 1.0,
                             dense_first_last=sparcl["dense_first_last"])
    else:
        cfg = SparsityConfig()
    wd, gd = cfg.densities(layers)
    current = training_flops(layers, samples, wd, gd)
    legacy = training_flops(layers, samples, wd, {n: cfg.grad_density for n in gd})
    # the runs of `bench run` use the default optimizer (SGD, no momentum) unless their config names one
    config = run["config"]
    optimizer = OptimizerConfig.from_dict(config["optimizer"]) if "optimizer" in config else OptimizerConfig()
    opt = sum(optimizer_flops(layers, run["steps"], optimizer, gd).values())
    for f, is_legacy in ((current, False), (legacy, True)):
        check = (f.total - run["train_flops"]) / run["train_flops"]
        if abs(check) <= SPLIT_TOLERANCE:
            return f.forward, f.input_grad, f.weight_grad, opt, check, is_legacy, current.total
    # The learner measures the weight-gradient density on the masks themselves (active and
    # DGM-kept entries), at most min(1 - sparsity, grad_density): forward and input-gradient
    # work follow the exact TDM densities, so the weight-gradient work is what remains.
    measured = run["train_flops"] - current.forward - current.input_grad
    if 0.0 <= measured <= current.weight_grad * (1.0 + SPLIT_TOLERANCE):
        check = (current.total - run["train_flops"]) / run["train_flops"]
        return current.forward, current.input_grad, measured, opt, check, False, run["train_flops"]
    return None


def cl_flops_table(out_dir: str | Path = "results/fmnist-s2-e10",
                   reference: str = "derpp") -> tuple[StrategyFlops, ...]:
    """One row per strategy of a `bench run` folder (means over seeds), in the matrix's order.

    Raises:
        FileNotFoundError: no run JSON in `out_dir/runs`.
    """
    from edgecl.bench.matrix import STRATEGIES, load_runs

    out_dir = Path(out_dir)
    runs = load_runs(out_dir)
    layers = _layer_table(out_dir)
    ref = float(np.mean([r["train_flops"] for r in runs[reference]])) if reference in runs else None
    order = [s for s in STRATEGIES if s in runs] + sorted(s for s in runs if s not in STRATEGIES)
    rows = []
    for strategy in order:
        rs = runs[strategy]
        total = float(np.mean([r["train_flops"] for r in rs]))
        splits = [_split(r, layers) for r in rs] if layers else [None]
        if all(s is not None for s in splits):
            split = [*np.mean([s[:5] for s in splits], axis=0).tolist(), any(s[5] for s in splits),
                     float(np.mean([s[6] for s in splits]))]
        else:
            split = [None] * 5 + [False, None]
        sparcl = rs[0]["config"]["strategy"].get("sparcl")
        engine = rs[0]["config"].get("job", {}).get("engine", "portable")
        label = rs[0]["config"].get("label", strategy)
        rows.append(StrategyFlops(strategy, label if engine == "portable" else f"{label} ({engine})", len(rs),
                                  float(sparcl["sparsity"]) if sparcl else 0.0, total,
                                  total / ref if ref else None, *split))
    return tuple(rows)


def _ratio(r: float | None) -> str:
    if r is None:
        return "n/a"
    return f"{r:.3f}x ({1 / r:.2f}x fewer)" if r < 0.999 else f"{r:.3f}x"


def markdown_table(rows, reference: str = "DER++") -> str:
    """The README's FLOPs table (TFLOP = 1e12 FLOPs, whole run, means over seeds), with a note under
    it for rows recorded with the earlier counting."""
    lines = [f"| strategy | seeds | training TFLOPs | vs dense {reference} | forward | input-grad | weight-grad | "
             f"optimizer (not in total) |", "|---|---|---|---|---|---|---|---|"]
    notes = []
    ref_total = next((r.train_flops / r.ratio_to_reference for r in rows if r.ratio_to_reference), None)
    for r in rows:
        split = ["n/a"] * 4 if r.forward is None else [
            f"{r.forward / 1e12:.3f}", f"{r.input_grad / 1e12:.3f}", f"{r.weight_grad / 1e12:.3f}",
            f"{r.optimizer / 1e12:.5f}"]
        mark = " (1)" if r.legacy_counting else ""
        lines.append(f"| {r.label}{mark} | {r.seeds} | {r.train_flops / 1e12:.3f} | {_ratio(r.ratio_to_reference)} | "
                     f"{' | '.join(split)} |")
        if r.legacy_counting:
            now = _ratio(r.current_total / ref_total) if ref_total else "n/a"
            notes.append(f"{r.label}: {r.current_total / 1e12:.3f} TFLOPs, {now} vs dense {reference}")
    if notes:
        lines += ["", "(1) recorded with weight-gradient work priced over masked-out weights too (at the DGM "
                      "density, or dense without DGM); counting only entries both active and kept by DGM, as "
                      "`bench flops` does: " + "; ".join(notes) + "."]
    return "\n".join(lines)
