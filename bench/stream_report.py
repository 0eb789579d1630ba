"""`bench stream`'s table and plot of a `StreamResult` (mean +- sample std over seeds)."""

from __future__ import annotations

from pathlib import Path

from .stream_run import StreamResult


def _pm(stat: dict, scale: float = 100.0, digits: int = 1) -> str:
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def format_table(result: StreamResult) -> str:
    """The final accuracy, the mean accuracy over seen tasks at each task boundary, the `learn` wall
    time and the median / p90 latency of one call, per method; then the SparCL-DER++ / DER++ ratio."""
    c = result.config
    rows = result.summary()
    tasks = len(rows[0]["seen_acc"])
    order = "natural class order" if c["class_order"] == "natural" else "seeded class order"
    head = (f"class-incremental {c['data']} stream: {tasks} tasks of 2 classes ({order}), groups of "
            f"{c['group'][0]}-{c['group'][1]} samples, each seen once, task-free (learn only)\n"
            f"{c['model']}, buffer {c['buffer_bytes']}, lr {c['lr']:g}, replay_batch {c['replay_batch']}, "
            f"replay_steps {c['replay_steps']}, {c['threads']} thread(s); seeds {', '.join(map(str, c['seeds']))} "
            f"(mean ± std)")
    width = max(len(r["label"]) for r in rows) + 2
    lines = [head, "",
             f"{'method':<{width}}{'final ACC %':>14}  " + "".join(f"{'T' + str(t + 1):>7}" for t in range(tasks))
             + f"{'learn s':>16}{'ms/call p50':>13}{'p90':>8}{'buffer':>8}{'GFLOPs':>9}"]
    for r in rows:
        lines.append(f"{r['label']:<{width}}{_pm(r['final_acc']):>14}  "
                     + "".join(f"{100 * s['mean']:>7.1f}" for s in r["seen_acc"])
                     + f"{_pm(r['learn_s'], 1.0):>16}{r['call_ms_median']:>13.2f}{r['call_ms_p90']:>8.2f}"
                     + f"{r['buffer_capacity']:>8}{r['train_flops'] / 1e9:>9.0f}")
    lines.append(f"(T1..T{tasks}: mean accuracy % over the tasks seen so far, after each task's last sample; GFLOPs: "
                 "training FLOPs counted the SparCL way, sparsity-aware)")
    methods = c["methods"]
    if "derpp" in methods and "sparcl-derpp" in methods:
        ratio = result.to_dict()["sparcl_derpp_over_derpp_learn_s"]
        lines.append(f"SparCL-DER++ {c['sparsity']:.2f} / DER++ learn wall time: {_pm(ratio, 1.0, 3)} (paired per seed, "
                     "same process, calls in turns)")
    if result.load_average is not None:
        lines.append(f"1-minute load average {result.load_average[0]:.2f} before, {result.load_average[1]:.2f} after")
    if result.torch_loaded:
        lines.append("note: torch was loaded in this process")
    return "\n".join(lines)


def plot_stream(result: StreamResult, path) -> Path:
    """Mean accuracy over the tasks seen so far after each task, per method (mean +- std band), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in result.summary():
        mean = 100 * np.array([s["mean"] for s in r["seen_acc"]])
        std = 100 * np.array([s["std"] for s in r["seen_acc"]])
        t = np.arange(1, len(mean) + 1)
        ax.plot(t, mean, marker="o", label=f"{r['label']} ({100 * r['final_acc']['mean']:.1f} %)")
        ax.fill_between(t, mean - std, mean + std, alpha=0.2)
    c = result.config
    ax.set(xlabel="after task (2 new classes each)", ylabel="accuracy on the classes seen so far (%)", ylim=(0, 100),
           xticks=range(1, len(mean) + 1),
           title=f"{c['data']} stream, groups of {c['group'][0]}-{c['group'][1]}, each sample once, buffer "
                 f"{c['buffer_bytes']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
