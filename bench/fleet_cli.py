"""`edgecl fleet simulate|local`: a fleet of devices learning together on Flower, one command each.

Both prepare a run folder (the devices' streams, `fleet.json`), export the model in a child
process (the host stays torch-free), run the rounds and write the JSON result: `simulate` on
Flower's simulation engine, `local` with a SuperLink and one SuperNode process per device on
localhost (`edgecl.fleet.local`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgecl.fleet.config import AGGREGATIONS, DATASETS, FleetConfig
from edgecl.fleet.codec import ENCODINGS


def add_fleet_parser(sub) -> None:
    p = sub.add_parser("fleet", help="federated continual learning on Flower (devices learning together)")
    fleet = p.add_subparsers(dest="fleet_command", required=True)
    for name, text in (("simulate", "every device a virtual SuperNode of Flower's simulation engine"),
                       ("local", "a SuperLink and one SuperNode process per device on localhost")):
        q = fleet.add_parser(name, help=text)
        q.add_argument("--clients", type=int, default=10, help="devices (default 10)")
        q.add_argument("--rounds", type=int, default=10, help="federated rounds, a multiple of --tasks (default 10)")
        q.add_argument("--data", default="digits", choices=DATASETS)
        q.add_argument("--tasks", type=int, default=5)
        q.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the split (default 0.5)")
        q.add_argument("--aggregation", default="fedavg", choices=AGGREGATIONS)
        q.add_argument("--mu", type=float, default=0.01, help="FedProx's proximal weight (default 0.01)")
        q.add_argument("--no-masked-aggregation", action="store_true",
                       help="ablation: average sparse devices' zero-filled weights as plain FedAvg does")
        q.add_argument("--method", default="derpp", choices=["finetune", "er", "derpp"])
        q.add_argument("--sparsity", type=float, default=None, help="SparCL on every device (default: dense)")
        q.add_argument("--encoding", default="dense", choices=ENCODINGS,
                       help="what a device sends: dense float32, sparse (mask bits + masked values), sparse-q8")
        q.add_argument("--epochs", type=int, default=1, help="local passes over a round's new examples")
        q.add_argument("--batch", type=int, default=32)
        q.add_argument("--replay-batch", type=int, default=32)
        q.add_argument("--buffer", type=int, default=200, help="replay examples per device (default 200)")
        q.add_argument("--lr", type=float, default=None, help="SGD learning rate (default 0.1 digits, 0.03 fmnist)")
        q.add_argument("--fraction", type=float, default=1.0, help="share of devices per round (default 1)")
        q.add_argument("--round-timeout", type=float, default=600.0, help="seconds; later replies are dropped")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--model", default="cnn")
        q.add_argument("--out", default="out", help="folder for the export cache and run folders (default out)")
        q.add_argument("--run-dir", default=None, help="the run folder (default: a new one under --out/fleet)")
        q.add_argument("--json", default=None, metavar="FILE", help="write the result as JSON")
        q.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "simulate":
            q.add_argument("--workers", type=int, default=None, help="devices trained at once (default: CPUs)")
        q.set_defaults(func=run_fleet_command)


def fleet_config(args) -> FleetConfig:
    return FleetConfig(clients=args.clients, rounds=args.rounds, data=args.data, tasks=args.tasks, alpha=args.alpha,
                       aggregation=args.aggregation, mu=args.mu,
                       masked_aggregation=not args.no_masked_aggregation, method=args.method, sparsity=args.sparsity,
                       encoding=args.encoding, epochs=args.epochs, batch_size=args.batch,
                       replay_batch=args.replay_batch, buffer=args.buffer, lr=args.lr, fraction=args.fraction,
                       round_timeout_s=args.round_timeout, seed=args.seed, model=args.model)


def load_fleet_data(data: str, seed: int):
    """(train, test) of a data set: digits split 80/20 as `edgecl run` does, Fashion-MNIST's own split."""
    from edgecl.runtime.data import load_digits, load_fashion_mnist
    from edgecl.runtime.scenarios import train_test_split

    if data == "digits":
        return train_test_split(load_digits(), 0.2, seed)
    return load_fashion_mnist(split="train"), load_fashion_mnist(split="test")


def prepare_fleet(config: FleetConfig, out: str | Path, run_dir: str | Path | None, mode: str) -> Path:
    """Export (cached, in a child process), split the data and write the run folder."""
    from edgecl.bench.export_cache import export_in_child
    from edgecl.fleet.prepare import prepare_run

    train, test = load_fleet_data(config.data, config.seed)
    artifacts = export_in_child(config.model, train.x.shape[1:], train.num_classes, [config.seed], out)[config.seed]
    if run_dir is None:
        run_dir = Path(out) / "fleet" / f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}-{config.clients}c"
    return prepare_run(config, train, test, artifacts, run_dir, mode)


def format_fleet(result: dict) -> str:
    """The result as a short table: per fleet task the final accuracy, then ACC, forgetting, bytes."""
    c = result["config"]
    lines = [f"fleet {result['mode']}: {c['clients']} devices, {c['rounds']} rounds, {c['data']}, "
             f"{c['aggregation']} + {c['method']}" + (f" SparCL {c['sparsity']}" if c.get("sparsity") else "")
             + f", {c['encoding']} updates"]
    if result.get("acc_matrix"):
        lines.append("accuracy on each fleet task after each task (%):")
        lines.append("  after | " + " ".join(f"T{j:<5}" for j in range(len(result["acc_matrix"]))))
        for t, row in enumerate(result["acc_matrix"]):
            lines.append(f"  T{t:<4} | " + " ".join(f"{100 * a:6.1f}" for a in row))
    lines.append(f"ACC {100 * result['acc']:.2f} %   forgetting "
                 + (f"{100 * result['forgetting']:.2f} %" if result.get("forgetting") is not None else "-"))
    sent = result.get("bytes_sent_per_round") or []
    if sent:
        lines.append(f"bytes per round: {sum(sent) / len(sent) / 1e6:.2f} MB (up {sum(result['bytes_up_per_round']) / len(sent) / 1e6:.2f}"
                     f", down {sum(result['bytes_down_per_round']) / len(sent) / 1e6:.2f})")
    refused = sum(len(r.get("refused", [])) for r in result.get("rounds", []))
    failed = sum(r.get("failed", 0) for r in result.get("rounds", []))
    late = sum(r.get("timed_out", 0) for r in result.get("rounds", []))
    lines.append(f"replies refused {refused}, failed {failed}, not in time {late}; "
                 f"wall time {result.get('wall_time_s', 0):.1f} s")
    return "\n".join(lines)


def run_fleet_command(args) -> int:
    from tqdm import tqdm

    try:
        import flwr  # noqa: F401
    except ImportError:
        raise ValueError("edgecl fleet runs on Flower, which is not installed: pip install 'edgecl[fleet]'") from None
    config = fleet_config(args)
    mode = args.fleet_command
    run_dir = prepare_fleet(config, args.out, args.run_dir, mode)
    started = time.perf_counter()
    with tqdm(total=config.rounds, desc=f"fleet {mode}", unit="round", disable=args.quiet, leave=False) as bar:
        def on_round(server_round, row):
            bar.set_postfix_str(f"acc {100 * row['acc_seen']:.1f}%")
            bar.update(server_round - bar.n)

        if mode == "simulate":
            from edgecl.fleet.simulate import simulate

            result = simulate(run_dir, workers=args.workers, on_round=on_round)
        else:
            from edgecl.fleet.local import run_local

            result = run_local(run_dir, on_round=on_round)
    result["wall_time_s"] = time.perf_counter() - started
    result["run_dir"] = str(run_dir)
    print(format_fleet(result))
    if args.json:
        from edgecl.runtime.files import write_atomic

        write_atomic(args.json, json.dumps(result, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="edgecl")
    add_fleet_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
