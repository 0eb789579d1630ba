"""The two references a fleet is compared with, on the same run folder and devices' streams.

- `local_only`: every device learns its own stream with the same learner, rounds and epochs, and
  never communicates (no federation). Each device's model is evaluated on every fleet task; the
  accuracy matrix and ACC are the means over devices.
- `centralised_joint`: one model trained on every device's examples at once, shuffled, as many
  passes as each device makes (`epochs`): the upper bound that needs all data in one place.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from edgecl.runtime.data import load_npz
from edgecl.runtime.online import open_learner

from .client import train_device
from .codec import ModelSpec, decode_update, dense_model
from .evaluation import TaskEvaluator, summarise
from .prepare import client_paths
from .scenario import ClientStream
from .server import read_run


def _start(run_dir: Path):
    run = read_run(run_dir)
    test = load_npz(run_dir / "data" / "test.npz")
    evaluator = TaskEvaluator(run["artifacts"], test, run["task_classes"])
    return run, run["config"], evaluator


def local_only(run_dir: str | Path, on_round=None) -> dict:
    """Every device alone (module docstring); returns the result like `server.run_fleet`'s."""
    run_dir = Path(run_dir)
    run, config, evaluator = _start(run_dir)
    engine = evaluator.engine
    spec = ModelSpec.from_manifest(engine.manifest)
    params = engine.parameters()
    initial = dense_model({n: params[n] for n in spec.weights}, engine.buffers())
    models = [dict(initial) for _ in range(config.clients)]
    settings = config.client_settings() | {"encoding": "dense"}
    matrices = np.zeros((config.clients, config.tasks, config.tasks))
    seen = np.zeros(config.clients)
    started = time.perf_counter()
    for server_round in range(1, config.rounds + 1):
        task = (server_round - 1) // config.rounds_per_task
        for k in range(config.clients):
            paths = client_paths(run_dir, k, run["artifacts"])
            update, _ = train_device(paths, settings, server_round, models[k])
            models[k] = update
            if server_round % config.rounds_per_task == 0:
                u = decode_update(update, spec, {})
                accs = evaluator.task_accuracies(u.weights, u.buffers)
                matrices[k, task] = accs
                seen[k] = evaluator.seen_accuracy(accs, task)
        if on_round is not None:
            on_round(server_round, {"acc_seen": float(seen.mean()), "elapsed_s": time.perf_counter() - started})
    result = summarise(matrices.mean(axis=0).tolist(), float(seen.mean()))
    result |= {"acc_per_device": seen.tolist(), "bytes_sent_per_round": [0] * config.rounds,
               "config": config.to_dict(), "mode": "local-only", "wall_time_s": time.perf_counter() - started}
    return result


def centralised_joint(run_dir: str | Path) -> dict:
    """One model on all devices' data (module docstring); acc only (no tasks, so no forgetting)."""
    run_dir = Path(run_dir)
    run, config, evaluator = _start(run_dir)
    streams = [ClientStream.load(client_paths(run_dir, k, run["artifacts"]).data_file) for k in range(config.clients)]
    x = np.concatenate([s.x for s in streams])
    y = np.concatenate([s.y for s in streams])
    rng = np.random.default_rng([config.seed, 5])
    state = run_dir / "joint-state"
    shutil.rmtree(state, ignore_errors=True)
    started = time.perf_counter()
    with open_learner(run["artifacts"], state, method="finetune", sparsity=None, budget=None,
                      batch_size=config.batch_size, lr=config.learning_rate, seed=config.seed, threads=1) as learner:
        for _ in range(config.epochs):
            order = rng.permutation(len(y))
            for i in range(0, len(y), 4096):
                rows = order[i : i + 4096]
                learner.learn(x[rows], y[rows])
        accs = evaluator.task_accuracies(learner.parameters(), learner.buffers())
    shutil.rmtree(state, ignore_errors=True)
    return {"acc": evaluator.seen_accuracy(accs, config.tasks - 1), "acc_matrix": None, "forgetting": None,
            "task_acc": accs, "bytes_sent_per_round": None, "config": config.to_dict(), "mode": "centralised-joint",
            "wall_time_s": time.perf_counter() - started}
