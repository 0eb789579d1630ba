"""`bench run` and `bench summary`: a matrix of continual-learning runs and its table.

Each cell of the matrix (strategy x seed) is one `edgecl run` in its own process with one
thread, so cells run side by side on a multi-core host and a crash or kill loses one cell
at most; a cell whose JSON exists is skipped, so re-running the command resumes. That
`edgecl run` trains in a runtime-only process of its own, so a cell's peak RSS is its
training's (the torch engine's cells train, and peak, in the process that exported).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgecl.runtime.files import check_output_dir

# name -> `edgecl run` arguments; the matrix of the README (Split Fashion-MNIST, buffer 500).
STRATEGIES = {
    "finetune": ["--method", "finetune", "--dense"],
    "joint": ["--method", "joint", "--dense"],
    "er": ["--method", "er", "--dense"],
    "derpp": ["--method", "derpp", "--dense"],
    "sparcl-er-0.75": ["--method", "er", "--sparsity", "0.75"],
    "sparcl-derpp-0.75": ["--method", "derpp", "--sparsity", "0.75"],
    "sparcl-er-0.90": ["--method", "er", "--sparsity", "0.90"],
    "sparcl-derpp-0.90": ["--method", "derpp", "--sparsity", "0.90"],
    "sparcl-derpp-0.75-no-tdm": ["--method", "derpp", "--sparsity", "0.75", "--no-tdm"],
    "sparcl-derpp-0.75-no-dgm": ["--method", "derpp", "--sparsity", "0.75", "--no-dgm"],
    "sparcl-derpp-0.75-no-ddr": ["--method", "derpp", "--sparsity", "0.75", "--no-ddr"],
    "sparcl-derpp-0.75-torch": ["--method", "derpp", "--sparsity", "0.75", "--engine", "torch"],
    "sparcl-derpp-0.75-ulp": ["--method", "derpp", "--sparsity", "0.75", "--nudge-ulp"],  # the float32 floor
    "derpp-torch": ["--method", "derpp", "--dense", "--engine", "torch"],  # the same, without SparCL's choices
    "derpp-ulp": ["--method", "derpp", "--dense", "--nudge-ulp"],
    # issue 13: SparCL on whole channels (sparsity = share of each channel set pruned) and dense DER++ on the
    # uniformly narrower cnn-s2 of about the same training FLOPs (width 7 ~ ch-0.50, width 10 ~ ch-0.25)
    "sparcl-derpp-ch-0.50": ["--method", "derpp", "--sparsity", "0.5", "--structure", "channel"],
    "sparcl-derpp-ch-0.25": ["--method", "derpp", "--sparsity", "0.25", "--structure", "channel"],
    "derpp-w7": ["--method", "derpp", "--dense", "--width", "7"],
    "derpp-w10": ["--method", "derpp", "--dense", "--width", "10"],
}


# what summaries, FLOPs tables and reports read from each cell's JSON
RUN_KEYS = ("acc_matrix", "acc", "task_il_acc", "forgetting", "bwt", "train_flops", "dense_train_flops",
            "peak_rss_bytes", "wall_s", "config")


@dataclasses.dataclass(frozen=True)
class Cell:
    strategy: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.strategy}-seed{self.seed}"


def run_matrix(strategies, seeds, out_dir, data: str = "fashion-mnist", epochs: int = 10, buffer: int = 500,
               workers: int = 2, progress: bool = True, model: str = "cnn-s2") -> list[Path]:
    """Run every (strategy, seed) cell not yet done; returns the JSON paths of all cells.

    Raises:
        ValueError: an unknown strategy name, workers < 1, an `out_dir` that cannot be a folder, or
            any cell's `edgecl run` arguments (a bad seed, epochs or buffer), before any cell starts.
        RuntimeError: a cell failed (its log is named; the others still ran).
    """
    from tqdm import tqdm

    from edgecl.bench.edgecl_cli import build_parser, run_job_config

    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"strategies {unknown} are unknown; accepted: {', '.join(STRATEGIES)}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}; accepted: an integer >= 1")
    out_dir = Path(out_dir)
    cells = [Cell(s, seed) for seed in seeds for s in strategies]  # seed-major: a first full table comes early
    commands = {c: _cell_arguments(c, out_dir, data, model, epochs, buffer) for c in cells}
    parser = build_parser()
    for cell, arguments in commands.items():  # what each `edgecl run` would refuse, refused before any starts
        try:
            run_job_config(parser.parse_args(arguments))
        except ValueError as e:
            raise ValueError(f"cell {cell.name}: {e}") from None
    check_output_dir(out_dir)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    _check_same_setting(out_dir, {"data": data, "model": model, "epochs": epochs, "buffer": buffer})
    todo = [c for c in cells if not (out_dir / "runs" / f"{c.name}.json").exists()]
    running: dict[Cell, subprocess.Popen] = {}
    failed = []
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), unit="run", disable=not progress)
    while todo or running:
        while todo and len(running) < workers:
            cell = todo.pop(0)
            args = [sys.executable, "-m", "edgecl.bench.edgecl_cli", *commands[cell]]
            log = open(out_dir / "runs" / f"{cell.name}.log", "w")
            running[cell] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        time.sleep(0.5)
        for cell, proc in list(running.items()):
            if proc.poll() is not None:
                del running[cell]
                bar.update(1)
                if proc.returncode != 0:
                    failed.append(cell.name)
    bar.close()
    if failed:
        raise RuntimeError(f"cells failed: {failed}; see {out_dir / 'runs'}/<cell>.log")
    return [out_dir / "runs" / f"{c.name}.json" for c in cells]


def replays(strategy: str) -> bool:
    """Whether a STRATEGIES entry replays examples (ER or DER++), i.e. has a buffer."""
    arguments = STRATEGIES[strategy]
    return arguments[arguments.index("--method") + 1] in ("er", "derpp")


def _cell_arguments(cell: Cell, out_dir: Path, data: str, model: str, epochs: int, buffer: int) -> list[str]:
    """`edgecl run` arguments of one cell (--buffer only where the strategy has a buffer)."""
    return ["run", "--data", data, "--model", model, "--epochs", str(epochs),
            *(["--buffer", str(buffer)] if replays(cell.strategy) else []), "--seed", str(cell.seed), "--threads",
            "1", "--quiet", "--out", str(out_dir), "--json", str(out_dir / "runs" / f"{cell.name}.json"),
            "--checkpoint", str(out_dir / "ckpt" / cell.name), *STRATEGIES[cell.strategy]]


def _check_same_setting(out_dir: Path, setting: dict) -> None:
    """Refuse to add cells to a folder whose finished runs used another data set, model, epochs or buffer.

    A cell is skipped when its JSON exists, so mixing settings in one folder would make a
    table of incomparable runs without a word.
    """
    for path in sorted((out_dir / "runs").glob("*.json")):
        job = read_run(path).get("config", {}).get("job", {})
        theirs = {k: job.get(k) for k in setting}
        if job.get("method") not in ("er", "derpp"):  # fine-tuning and joint have no buffer to compare
            theirs["buffer"] = setting["buffer"]
        if theirs != setting:
            raise ValueError(f"{out_dir} holds runs of {theirs} ({path.name}); asked for {setting}; accepted: the "
                             "same setting, or another --out folder")


def read_run(path: Path) -> dict:
    """One cell's JSON, as `edgecl run --json` wrote it.

    Raises:
        ValueError: not a run JSON (unreadable, truncated, or without its metrics); the file is named.
    """
    try:
        run = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable run JSON ({e}); delete it and `bench run` runs that cell "
                         "again") from e
    missing = [k for k in RUN_KEYS if not isinstance(run, dict) or k not in run]
    if missing:
        raise ValueError(f"{path} is not a run JSON: no {', '.join(missing)}; accepted: what `edgecl run --json` "
                         "writes")
    if not isinstance(run["config"], dict):
        raise ValueError(f"{path} is not a run JSON: its config is {type(run['config']).__name__}, not an object")
    return run


def load_runs(out_dir) -> dict[str, list[dict]]:
    """strategy -> its cells' JSONs (seed order) under `out_dir/runs`.

    Raises:
        FileNotFoundError: no run JSON there. ValueError: one is not a run JSON (named).
    """
    runs: dict[str, list[dict]] = {}
    for path in sorted(Path(out_dir, "runs").glob("*.json")):
        runs.setdefault(path.stem.rsplit("-seed", 1)[0], []).append(read_run(path))
    if not runs:
        raise FileNotFoundError(f"no run JSON under {str(Path(out_dir, 'runs'))!r}; run `bench run --out {out_dir}` "
                                "first")
    return runs


def summarize(out_dir, reference: str = "derpp") -> list[dict]:
    """Mean and standard deviation over seeds of each strategy's metrics, FLOPs relative to `reference`."""
    runs = load_runs(out_dir)
    ref_flops = np.mean([r["train_flops"] for r in runs.get(reference, [])]) if reference in runs else None
    ref_wall = {_seed(r): r["wall_s"] for r in runs.get(reference, [])}
    rows = []
    for strategy in [s for s in STRATEGIES if s in runs]:
        rs = runs[strategy]

        def stat(key, scale=1.0):
            v = np.array([r[key] for r in rs], float) * scale
            return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0

        flops = np.mean([r["train_flops"] for r in rs])
        label = rs[0]["config"].get("label", strategy)
        job = rs[0]["config"].get("job", {})
        engine = job.get("engine", "portable")
        if job.get("width") is not None:  # a narrower (or wider) network of the family: the label says which
            label = f"{label} (width {job['width']})"
        rows.append({"strategy": strategy, "label": label if engine == "portable" else f"{label} ({engine})",
                     "seeds": len(rs),
                     "acc": stat("acc", 100), "task_il_acc": stat("task_il_acc", 100),
                     "forgetting": stat("forgetting", 100), "bwt": stat("bwt", 100),
                     "flops_vs_reference": float(flops / ref_flops) if ref_flops else None,
                     "fewer_flops_than_reference": float(ref_flops / flops) if ref_flops else None,
                     "peak_rss_mib": stat("peak_rss_bytes", 1 / 2**20), "wall_s": stat("wall_s"),
                     "wall_vs_reference": _median_ratio(rs, ref_wall)})
    return rows


def _seed(run: dict):
    return run["config"].get("job", {}).get("seed", run["config"].get("run", {}).get("seed"))


def _median_ratio(rs: list[dict], ref_wall: dict) -> float | None:
    """Median over seeds of wall(run) / wall(the reference's run of the same seed); None without one."""
    ratios = [r["wall_s"] / ref_wall[_seed(r)] for r in rs if ref_wall.get(_seed(r))]
    return float(np.median(ratios)) if ratios else None


def markdown_table(rows: list[dict], reference: str = "DER++") -> str:
    head = (f"| strategy | seeds | ACC class-IL (%) | ACC task-IL (%) | forgetting (%) | training FLOPs vs dense "
            f"{reference} | peak RSS (MiB) | wall (s) | wall vs dense {reference} (median of per-seed ratios) |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        f = r["flops_vs_reference"]
        flops = "n/a" if f is None else f"{f:.2f}x ({r['fewer_flops_than_reference']:.1f}x fewer)" if f < 0.999 else f"{f:.2f}x"
        w = r.get("wall_vs_reference")
        wall = "n/a" if w is None else f"{w:.2f}x" + (f" ({1 / w:.2f}x faster)" if w < 0.999 else "")

        def cell(key):  # one seed has no spread: say so rather than print ± 0.00
            mean, sd = r[key]
            return f"{mean:.2f} ± {sd:.2f}" if r["seeds"] > 1 else f"{mean:.2f} (one seed)"

        lines.append(f"| {r['label']} | {r['seeds']} | {cell('acc')} | {cell('task_il_acc')} | {cell('forgetting')} | "
                     f"{flops} | {r['peak_rss_mib'][0]:.0f} | {r['wall_s'][0]:.0f} | {wall} |")
    return "\n".join(lines)
