"""`python -m edgecl.bench.fleet_table`: the README's fleet comparison, every row from one run folder's streams.

10 devices, Split Fashion-MNIST (5 tasks), the same Dirichlet split and devices' learners for
every row: local-only learning (no federation), FedAvg + DER++, FedProx + DER++, FedAvg + SparCL-
DER++ 0.75 with masked aggregation (dense, sparse and 8-bit updates), and centralised joint
training. Writes results/fleet/<row>.json and table.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

from edgecl.bench.fleet_cli import format_fleet, prepare_fleet
from edgecl.fleet.config import FleetConfig
from edgecl.runtime.files import write_atomic

ROWS = {  # name -> (label, FleetConfig changes, how it runs)
    "local-only": ("Local only, DER++ (no federation)", {}, "local"),
    "fedavg-derpp": ("FedAvg + DER++", {}, "simulate"),
    "fedprox-derpp": ("FedProx (mu 0.01) + DER++", {"aggregation": "fedprox"}, "simulate"),
    "fedavg-sparcl": ("FedAvg + SparCL-DER++ 0.75, masked, dense updates", {"sparsity": 0.75}, "simulate"),
    "fedavg-sparcl-sparse": ("... sparse updates", {"sparsity": 0.75, "encoding": "sparse"}, "simulate"),
    "fedavg-sparcl-q8": ("... sparse 8-bit updates", {"sparsity": 0.75, "encoding": "sparse-q8"}, "simulate"),
    "fedavg-sparcl-unmasked": ("... ablation: zeros averaged in (no masked aggregation)",
                               {"sparsity": 0.75, "masked_aggregation": False}, "simulate"),
    "joint": ("Centralised joint (upper bound)", {}, "joint"),
}


def run_row(name: str, base: FleetConfig, work: Path) -> dict:
    from edgecl.fleet.baselines import centralised_joint, local_only
    from edgecl.fleet.simulate import simulate

    label, changes, how = ROWS[name]
    config = dataclasses.replace(base, **changes)
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    run_dir = prepare_fleet(config, work, work / "runs" / name, how)
    started = time.perf_counter()
    if how == "simulate":
        result = simulate(run_dir)
    elif how == "local":
        result = local_only(run_dir)
    else:
        result = centralised_joint(run_dir)
    result["wall_time_s"] = time.perf_counter() - started
    result["label"] = label
    return result


def table(results: dict) -> str:
    lines = ["| | ACC (%) | forgetting (%) | bytes up / round | bytes down / round | wall time (s) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        up, down = r.get("bytes_up_per_round"), r.get("bytes_down_per_round")
        mb = (lambda v: f"{sum(v) / len(v) / 1e6:.2f} MB" if v else "-")
        f = r.get("forgetting")
        lines.append(f"| {r['label']} | {100 * r['acc']:.1f} | {'-' if f is None else f'{100 * f:.1f}'} | {mb(up)} | "
                     f"{mb(down)} | {r['wall_time_s']:.0f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Average accuracy over the tasks seen so far, after each task, one line per row (the joint
    training's single point at the end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results.values():
        m = r.get("acc_matrix")
        if m:
            curve = [100 * sum(row[: t + 1]) / (t + 1) for t, row in enumerate(m)]
            ax.plot(range(1, len(curve) + 1), curve, marker="o", label=r["label"])
        else:
            ax.plot([r["config"]["tasks"]], [100 * r["acc"]], marker="*", markersize=12, linestyle="none",
                    label=r["label"])
    ax.set_xticks(range(1, results[next(iter(results))]["config"]["tasks"] + 1))
    ax.set_xlabel("fleet task")
    ax.set_ylabel("accuracy on the tasks seen (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{results[next(iter(results))]['config']['clients']} devices, Split "
                 f"{results[next(iter(results))]['config']['data']}, global model after each task")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgecl.bench.fleet_table")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--replot", action="store_true", help="only redraw table.md and accuracy.png from --out's JSON")
    p.add_argument("--out", default="results/fleet", help="where the JSON results and table.md go")
    p.add_argument("--work", default="out", help="export cache and run folders (default out)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = FleetConfig(clients=args.clients, rounds=args.rounds, data=args.data, epochs=args.epochs)
    results = {}
    if args.replot:
        results = {name: json.loads((out / f"{name}.json").read_text()) for name in args.rows.split(",")}
        write_atomic(out / "table.md", table(results) + "\n")
        plot(results, out / "accuracy.png")
        print(table(results))
        return 0
    for name in args.rows.split(","):
        results[name] = run_row(name, base, Path(args.work))
        write_atomic(out / f"{name}.json", json.dumps(results[name], indent=1))
        print(f"{name}: ACC {100 * results[name]['acc']:.1f} %  ({results[name]['wall_time_s']:.0f} s)", flush=True)
    write_atomic(out / "table.md", table(results) + "\n")
    plot(results, out / "accuracy.png")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
