"""`bench drift`: how far two engines' runs from one seed end apart, next to float32 rounding alone.

Per seed, three runs of the same job: engine A, engine B, and engine A again with one weight
of the first layer moved by one ulp (numpy.nextafter) before training. Training is chaotic:
a difference of one rounding grows over thousands of SGD steps and flips discrete choices
(masks, removed examples, argmax), so two correct float32 implementations end apart by about
what one ulp does to one of them. |ACC(A) - ACC(B)| is the engines' difference;
|ACC(A) - ACC(A, 1 ulp)| is that floor, measured the same way.
"""

from __future__ import annotations

import dataclasses
import statistics

from edgecl.runtime.files import check_output_dir

from .cl_run import JobConfig, run_job


@dataclasses.dataclass(frozen=True)
class DriftRow:
    seed: int
    acc_a: float
    acc_b: float
    acc_a_ulp: float

    @property
    def engines_gap(self) -> float:
        return abs(self.acc_a - self.acc_b)

    @property
    def ulp_gap(self) -> float:
        return abs(self.acc_a - self.acc_a_ulp)


@dataclasses.dataclass(frozen=True)
class DriftResult:
    job: JobConfig  # the job of seed rows[0]; every row differs in seed (and engine) only
    engine_b: str
    rows: tuple

    def summary(self) -> dict:
        """Median and max over seeds of both gaps, in ACC points."""
        out = {}
        for key in ("engines_gap", "ulp_gap"):
            gaps = [100 * getattr(r, key) for r in self.rows]
            out[key] = {"median": statistics.median(gaps), "max": max(gaps), "mean": statistics.fmean(gaps)}
        return out

    def to_dict(self) -> dict:
        return {"kind": "drift", "job": dataclasses.asdict(self.job), "engine_a": self.job.engine,
                "engine_b": self.engine_b, "label": self.job.strategy().label,
                "rows": [{**dataclasses.asdict(r), "engines_gap": r.engines_gap, "ulp_gap": r.ulp_gap}
                         for r in self.rows], "summary": self.summary()}


def measure_drift(job: JobConfig, seeds, engine_b: str = "torch", out_dir="out", progress: bool = True) -> DriftResult:
    """Three runs per seed (job.engine, engine_b, job.engine with one ulp moved); see the module doc.

    Raises:
        ValueError: no seeds, engine_b equal to job.engine, an `out_dir` that cannot be a folder, or
            what JobConfig refuses (for any seed, before the first run).
    """
    from tqdm import tqdm

    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds=[]; accepted: one or more seeds")
    if engine_b == job.engine:
        raise ValueError(f"engine_b={engine_b!r} is the job's own engine; accepted: another of portable, "
                         "ort-training, torch")
    check_output_dir(out_dir)
    runs = []  # every run's config first: a bad seed or engine is refused before the first run, not after some
    for seed in seeds:
        a = dataclasses.replace(job, seed=seed)
        runs.append((seed, (a, dataclasses.replace(a, engine=engine_b), dataclasses.replace(a, nudge_ulp=True))))
    rows = []
    bar = tqdm(total=3 * len(seeds), unit="run", disable=not progress)
    for seed, variants in runs:
        accs = []
        for variant in variants:
            result, _, _ = run_job(variant, out_dir, progress=False, isolate=False)  # ACC only: no memory to measure
            accs.append(result.acc)
            bar.update(1)
        rows.append(DriftRow(seed, *accs))
    bar.close()
    return DriftResult(dataclasses.replace(job, seed=seeds[0]), engine_b, tuple(rows))


def format_table(result: DriftResult) -> str:
    """One line per seed (ACC %, gaps in points), then median and max of both gaps."""
    a, b = result.job.engine, result.engine_b
    lines = [f"{result.job.strategy().label} on {result.job.data}, {result.job.epochs} epochs/task: final ACC (%)",
             f"{'seed':>5}{a:>12}{b:>12}{a + ' +1ulp':>16}{'|' + a + '-' + b + '|':>22}{'|1 ulp|':>10}"]
    for r in result.rows:
        lines.append(f"{r.seed:>5}{100 * r.acc_a:>12.2f}{100 * r.acc_b:>12.2f}{100 * r.acc_a_ulp:>16.2f}"
                     f"{100 * r.engines_gap:>22.2f}{100 * r.ulp_gap:>10.2f}")
    s = result.summary()
    for stat in ("median", "mean", "max"):
        lines.append(f"{stat:>5}{'':>40}{s['engines_gap'][stat]:>22.2f}{s['ulp_gap'][stat]:>10.2f}")
    return "\n".join(lines)
