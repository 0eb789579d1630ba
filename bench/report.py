"""`bench report`: a Markdown report with PNG plots from saved results.

Inputs, all optional but at least one:
- a `bench run` folder (`runs/*.json`): accuracy versus training FLOPs across sparsities,
  the FLOPs table, the accuracy matrices;
- latency JSON files, shape {"kind": "latency", "rows": [{"model", "engine", "target",
  "source": "measured" | "projected", "median_ms", "iqr_ms", "ratio_to_torch", "phase"?}]}
  (as `bench latency --json` writes; "phase" optional: "train", "infer", "cold_start", default
  "train"; iqr_ms and ratio_to_torch may be null; other keys are ignored);
- memory JSON files, shape {"kind": "memory", "rows": [{"engine", "process", "peak_rss_bytes",
  "ratio_to_torch", "model"?}]} (as `bench memory --json` writes; ratio_to_torch may be null).
Measured and projected latency rows never share a table or a plot.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from edgecl.runtime.files import check_output_dir

LATENCY_KEYS = ("model", "engine", "target", "source", "median_ms")
MEMORY_KEYS = ("engine", "process", "peak_rss_bytes")
SOURCES = ("measured", "projected")


@dataclasses.dataclass(frozen=True)
class ReportResult:
    """What `write_report` wrote: the Markdown file and the PNGs it links."""

    markdown: Path
    plots: tuple[Path, ...]
    sections: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"markdown": str(self.markdown), "plots": [str(p) for p in self.plots], "sections": list(self.sections)}


def read_rows(path: str | Path, kind: str) -> list[dict]:
    """The rows of a latency or memory JSON file, checked against the documented shape.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, another kind, a row missing a key (named), a source other than measured/projected.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{kind} file {str(path)!r} is not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("kind") != kind or not isinstance(data.get("rows"), list):
        raise ValueError(f"{kind} file {str(path)!r}: accepted: {{\"kind\": \"{kind}\", \"rows\": [...]}}")
    required = LATENCY_KEYS if kind == "latency" else MEMORY_KEYS
    for i, row in enumerate(data["rows"]):
        missing = [k for k in required if k not in row]
        if missing:
            raise ValueError(f"{kind} file {str(path)!r}: rows[{i}] lacks {missing}; required: {', '.join(required)}")
        if kind == "latency" and row["source"] not in SOURCES:
            raise ValueError(f"{kind} file {str(path)!r}: rows[{i}] source={row['source']!r}; accepted: measured, "
                             f"projected")
    shape = data.get("input_shape")  # the same model name at two input sizes must not look alike
    suffix = f" {'x'.join(str(d) for d in shape)}" if isinstance(shape, list) and shape else ""
    return [{**row, "model": f"{row['model']}{suffix}"} if "model" in row and suffix else row for row in data["rows"]]


def _run_groups(runs_dir: Path) -> dict[str, list[dict]]:
    from edgecl.bench.matrix import STRATEGIES, load_runs

    groups = load_runs(runs_dir)  # names a truncated or foreign JSON; no JSON at all is FileNotFoundError
    return {s: groups[s] for s in [*[s for s in STRATEGIES if s in groups], *sorted(set(groups) - set(STRATEGIES))]}


def _label(runs: list[dict], strategy: str) -> str:
    label = runs[0]["config"].get("label", strategy)
    engine = runs[0]["config"].get("job", {}).get("engine", "portable")
    return label if engine == "portable" else f"{label} ({engine})"


def _plot_acc_vs_flops(plt, groups, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(10, 4.8))
    for k, (strategy, runs) in enumerate(groups.items()):
        sparcl = runs[0]["config"]["strategy"].get("sparcl")
        sparsity = sparcl["sparsity"] if sparcl else 0.0
        acc = 100 * np.array([r["acc"] for r in runs])
        flops = np.mean([r["train_flops"] for r in runs]) / 1e12
        marker = "o" if sparsity == 0 else "s" if sparsity < 0.8 else "^"
        ax.errorbar(flops, acc.mean(), yerr=acc.std(ddof=1) if len(acc) > 1 else 0, fmt=marker, capsize=3,
                    color=plt.cm.tab20(2 * k % 20 + k // 10 % 2), label=f"{_label(runs, strategy)} (sparsity {sparsity:g})")
    ax.set_xscale("log")  # the strategies differ by ratios ("5x fewer"), and a log axis shows them evenly
    ax.set_xlabel("training TFLOPs (whole run, SparCL counting; log scale)")
    ax.set_ylabel("class-IL accuracy (%)")
    ax.set_title("Accuracy versus training FLOPs (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: it hid points
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_acc_matrices(plt, groups, path: Path) -> None:
    n = len(groups)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (strategy, runs) in zip(axes.flat, groups.items()):
        R = 100 * np.mean([r["acc_matrix"] for r in runs], axis=0)
        ax.imshow(np.ma.masked_where(np.triu(np.ones_like(R, bool), 1), R), vmin=0, vmax=100, cmap="viridis")
        for (i, j), v in np.ndenumerate(R):
            if j <= i:
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 60 else "k")
        ax.set_title(_label(runs, strategy), fontsize=8)
        ax.set_xlabel("task evaluated", fontsize=7)
        ax.set_ylabel("after training task", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Accuracy matrices R[t][i] (%, class-IL, mean over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_bars(plt, labels, values, errors, title, ylabel, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(labels) + 2), 4))
    ax.bar(range(len(labels)), values, yerr=errors, capsize=3, color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=40, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_grouped(plt, rows: list[dict], title: str, path: Path) -> None:
    """One panel per phase; models along x, one bar per engine @ target. Bars are ratios to
    torch eager when every row of the panel has one (a line at 1x), else medians in ms."""
    phases = list(dict.fromkeys(_phase(r) for r in rows))
    fig, axes = plt.subplots(1, len(phases), figsize=(5.5 * len(phases), 4), squeeze=False)
    for ax, phase in zip(axes.flat, phases):
        part = [r for r in rows if _phase(r) == phase]
        models = list(dict.fromkeys(r["model"] for r in part))
        series = list(dict.fromkeys(f"{r['engine']} @ {r['target']}" for r in part))
        ratios = all(r.get("ratio_to_torch") is not None for r in part)
        width = 0.8 / len(series)
        for k, name in enumerate(series):
            values = {r["model"]: (r["ratio_to_torch"] if ratios else r["median_ms"]) for r in part
                      if f"{r['engine']} @ {r['target']}" == name}
            xs = [i + (k - (len(series) - 1) / 2) * width for i, m in enumerate(models) if m in values]
            ax.bar(xs, [values[m] for m in models if m in values], width, label=name)
        if ratios:
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("median / torch eager's median" if ratios else "median ms")
        ax.set_title(phase.replace("_", " "), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _phase(row: dict) -> str:
    return row.get("phase") or row.get("metric") or "train"


def _ratio(r) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def _runs_section(plt, runs_dir: Path, out: Path, plots: list) -> list[str]:
    from edgecl.bench.cl_flops import cl_flops_table, markdown_table as flops_markdown
    from edgecl.bench.matrix import markdown_table, summarize

    groups = _run_groups(runs_dir)
    _plot_acc_vs_flops(plt, groups, out / "acc_vs_flops.png")
    _plot_acc_matrices(plt, groups, out / "acc_matrices.png")
    plots += [out / "acc_vs_flops.png", out / "acc_matrices.png"]
    return ["## Continual learning", "", f"From `{runs_dir}` ({sum(len(r) for r in groups.values())} runs).", "",
            markdown_table(summarize(runs_dir)), "", "![accuracy versus training FLOPs](acc_vs_flops.png)", "",
            "### Training FLOPs", "",
            "Whole run, means over seeds (TFLOP = 1e12). The split is rebuilt from the layer table and each "
            "run's densities, the weight-gradient part as measured where the run measured it on the masks "
            "(see `edgecl.bench.cl_flops`).", "",
            flops_markdown(cl_flops_table(runs_dir)), "", "### Accuracy matrices", "",
            "![accuracy matrices](acc_matrices.png)", ""]


def _latency_section(plt, rows: list[dict], out: Path, plots: list) -> list[str]:
    lines = ["## Latency", ""]
    for source in SOURCES:
        part = [r for r in rows if r["source"] == source]
        if not part:
            continue
        title = "Measured on this machine" if source == "measured" else (
            "PROJECTED (roofline from device profiles, not measured)")
        lines += [f"### {title}", "", "| model | phase | engine | target | median (ms) | IQR (ms) | vs torch eager |",
                  "|---|---|---|---|---|---|---|"]
        for r in part:
            iqr = r.get("iqr_ms")
            lines.append(f"| {r['model']} | {_phase(r)} | {r['engine']} | {r['target']} | "
                         f"{r['median_ms']:.3f} | {'n/a' if iqr is None else f'{iqr:.3f}'} | "
                         f"{_ratio(r.get('ratio_to_torch'))} |")
        name = f"latency_{source}.png"
        _plot_grouped(plt, part, f"Latency, {source}" + (" (roofline projection)" if source == "projected" else ""),
                      out / name)
        plots.append(out / name)
        lines += ["", f"![latency {source}]({name})", ""]
    return lines


def _memory_section(plt, rows: list[dict], out: Path, plots: list) -> list[str]:
    lines = ["## Peak memory (measured)", "", "| model | engine | process | peak RSS (MiB) | vs torch eager |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.get('model', '')} | {r['engine']} | {r['process']} | {r['peak_rss_bytes'] / 2**20:.1f} | "
                     f"{_ratio(r.get('ratio_to_torch'))} |")
    labels = [f"{r.get('model', '')} {r['engine']}\n{r['process']}".strip() for r in rows]
    _plot_bars(plt, labels, [r["peak_rss_bytes"] / 2**20 for r in rows],
               None, "Peak resident memory, measured", "MiB", out / "memory.png")
    plots.append(out / "memory.png")
    return [*lines, "", "![peak memory](memory.png)", ""]


def write_report(out_dir: str | Path = "results/report", runs: str | Path | None = None, latency=(),
                 memory=()) -> ReportResult:
    """Write `out_dir/report.md` and its PNGs from a `bench run` folder and latency / memory JSON files.

    Args:
        out_dir: created if needed; report.md and *.png are (over)written there.
        runs: a `bench run` folder (None: no continual-learning section).
        latency, memory: JSON files of the documented shapes (module docstring).
    Returns:
        ReportResult.
    Raises:
        ValueError: nothing to report, a malformed input file (named), or an `out_dir` that cannot be a folder.
        FileNotFoundError: a missing input.
    """
    check_output_dir(out_dir)  # before reading anything: a file there would fail only at the first plot
    latency_rows = [row for p in latency for row in read_rows(p, "latency")]
    memory_rows = [row for p in memory for row in read_rows(p, "memory")]
    if runs is None and not latency_rows and not memory_rows:
        raise ValueError("nothing to report: give a runs folder, latency JSON or memory JSON")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots: list[Path] = []
    sections: list[str] = []
    lines = ["# edgecl benchmark report", "",
             "Measured figures come from this machine; figures marked PROJECTED come from a roofline over a device "
             "profile (`bench devices`) and are never mixed with measured ones.", ""]
    if runs is not None:
        lines += _runs_section(plt, Path(runs), out, plots)
        sections.append("continual-learning")
    if latency_rows:
        lines += _latency_section(plt, latency_rows, out, plots)
        sections.append("latency")
    if memory_rows:
        lines += _memory_section(plt, memory_rows, out, plots)
        sections.append("memory")
    md = out / "report.md"
    md.write_text("\n".join(lines))
    return ReportResult(md, tuple(plots), tuple(sections))
