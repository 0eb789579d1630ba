"""The server side: a Flower `ServerApp` that runs a fleet's rounds and writes the result.

The host prepares a run folder (`prepare_run`): `fleet.json` (the settings, the fleet's tasks, the
exported model's folder), `data/` (each device's stream, the test set) and `state/` (each device's
state folder, in a simulation or a localhost deployment). The ServerApp reads `fleet.json`, starts
the chosen strategy (`strategy.build_strategy`) from the exported model's initial weights, evaluates
the global model on every fleet task after each round (Flower's centralised `evaluate_fn`),
writes `progress.json` after each round, and `result.json` and the final model (`global.npz`) at
the end, all atomically.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import flwr
import numpy as np
from flwr.app import ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from edgecl.runtime.data import load_npz
from edgecl.runtime.files import write_atomic

from .codec import ModelSpec, dense_model, split_model
from .config import FleetConfig
from .evaluation import TaskEvaluator, summarise
from .records import from_record, to_record
from .strategy import build_strategy

RUN_FILE = "fleet.json"
RESULT_FILE = "result.json"
PROGRESS_FILE = "progress.json"
GLOBAL_FILE = "global.npz"  # the final global model: w:<weight> and b:<buffer> arrays


def read_run(run_dir: str | Path) -> dict:
    """`fleet.json` of a run folder.

    Raises:
        FileNotFoundError: no such file. ValueError: not JSON, or its settings are bad.
    """
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist; accepted: a run folder prepared by edgecl fleet")
    try:
        run = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not JSON: {e}") from None
    run["config"] = FleetConfig.from_dict(run["config"])
    return run


def _write_json(path: Path, value: dict) -> None:
    write_atomic(path, json.dumps(value, indent=1, allow_nan=False))


def run_fleet(grid: Grid, run_dir: str | Path, on_round: Callable[[int, dict], None] | None = None) -> dict:
    """Run every round of the fleet in `run_dir` on `grid`; returns (and writes) the result.

    on_round(round, row) is called after each round's evaluation (a progress bar)."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    config: FleetConfig = run["config"]
    test = load_npz(run_dir / "data" / "test.npz")
    evaluator = TaskEvaluator(run["artifacts"], test, run["task_classes"])
    engine = evaluator.engine
    spec = ModelSpec.from_manifest(engine.manifest)
    params = engine.parameters()
    initial = dense_model({n: params[n] for n in spec.weights}, engine.buffers())
    strategy = build_strategy(config.aggregation, spec, config.clients, config.fraction, config.proximal_mu,
                              config.masked_aggregation)
    rpt = config.rounds_per_task
    per_round: list[dict] = []
    matrix: list[list[float]] = []
    started = time.perf_counter()

    def evaluate(server_round: int, record) -> MetricRecord:
        weights, buffers = split_model(from_record(record))
        accs = evaluator.task_accuracies(weights, buffers)
        task = min(max(server_round - 1, 0) // rpt, config.tasks - 1)
        if server_round == 0:
            return MetricRecord({"acc-seen": evaluator.seen_accuracy(accs, 0)})
        row = {"round": server_round, "task": task, "acc_seen": evaluator.seen_accuracy(accs, task),
               "task_acc": accs, **strategy.rounds.get(server_round, {}),
               "elapsed_s": time.perf_counter() - started}
        per_round.append(row)
        if server_round % rpt == 0:
            matrix.append(accs)
        _write_json(run_dir / PROGRESS_FILE, {"rounds_done": server_round, "rounds": config.rounds, "last": row})
        if on_round is not None:
            on_round(server_round, row)
        return MetricRecord({"acc-seen": row["acc_seen"]})

    settings = ConfigRecord(config.client_settings())
    outcome = strategy.start(grid=grid, initial_arrays=to_record(initial), num_rounds=config.rounds,
                             timeout=config.round_timeout_s, train_config=settings, evaluate_fn=evaluate)
    buf = io.BytesIO()
    np.savez(buf, **from_record(outcome.arrays if outcome.arrays is not None else to_record(initial)))
    write_atomic(run_dir / GLOBAL_FILE, buf.getvalue())
    final = per_round[-1]["acc_seen"] if per_round else 0.0
    result = summarise(matrix, final)
    down = [r.get("bytes_down", 0) for r in per_round]
    up = [r.get("bytes_up", 0) for r in per_round]
    result |= {"bytes_sent_per_round": [d + u for d, u in zip(down, up)], "bytes_down_per_round": down,
               "bytes_up_per_round": up, "rounds": per_round, "config": config.to_dict(),
               "task_classes": run["task_classes"], "devices": run["devices"], "mode": run.get("mode", ""),
               "flwr": flwr.__version__, "server_wall_time_s": time.perf_counter() - started}
    _write_json(run_dir / RESULT_FILE, result)
    return result


def make_server_app(run_dir: str | Path | None = None,
                    on_round: Callable[[int, dict], None] | None = None) -> ServerApp:
    """A `ServerApp` on the run folder `run_dir` (None: the run config's "run-dir", as `flwr run -c` sets)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        folder = run_dir if run_dir is not None else context.run_config.get("run-dir", "")
        if not folder:
            raise ValueError("no run folder: give the run config run-dir=\"...\" (edgecl fleet local does)")
        run_fleet(grid, folder, on_round)

    return app


app = make_server_app()  # what a deployment's SuperLink runs (the Flower app's `serverapp` component)
