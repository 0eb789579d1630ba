"""The continual-learning loop: tasks -> epochs -> batches, evaluation after every task, checkpoints.

`run_scenario` trains a `Learner` on a `Scenario` and returns a `RunResult` with the
accuracy matrix and every metric. With a checkpoint folder it saves the whole state at task
ends and every N steps, and a run killed at any moment resumes from the last checkpoint
and ends with exactly the metrics of an uninterrupted run (same seed): the order of every
epoch is a pure function of (seed, task, epoch), and every other random draw comes from a
generator whose state is in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from .budget import peak_rss_bytes
from .checkpoint import load_checkpoint, save_checkpoint
from .metrics import average_accuracy, backward_transfer, class_il_accuracy, forgetting, forward_transfer, task_il_accuracy
from .scenarios import Scenario
from .strategies import Learner, Method


MAX_SEED = 2**64 - 1  # torch.manual_seed's largest: the host seeds a model's initial weights with the run's seed


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Training schedule: epochs per task, batch size, seed, checkpoint cadence (steps; 0: task ends)."""

    epochs: int = 5
    batch_size: int = 32
    seed: int = 0
    checkpoint_every: int = 0

    def __post_init__(self):
        why = {"batch_size": " (BatchNorm needs two samples)", "seed": " and <= 2**64 - 1"}
        for name, low in (("epochs", 1), ("batch_size", 2), ("seed", 0), ("checkpoint_every", 0)):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low
                    or name == "seed" and value > MAX_SEED):
                raise ValueError(f"{name}={value!r}; accepted: an integer >= {low}{why.get(name, '')}")


@dataclasses.dataclass(frozen=True)
class RunResult:
    """Everything a run measured. Accuracies are fractions in [0, 1]; FLOPs are counts."""

    acc_matrix: list
    task_il_matrix: list
    acc: float
    task_il_acc: float
    bwt: float
    forgetting: float
    fwt: float
    train_flops: float
    dense_train_flops: float
    steps: int
    peak_rss_bytes: int | None
    wall_s: float
    resumed: bool
    config: dict

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def epoch_order(seed: int, task: int, epoch: int, active: np.ndarray) -> np.ndarray:
    """The shuffled indices of the still-active examples for one epoch (a pure function)."""
    return np.random.default_rng([seed, task, epoch]).permutation(np.flatnonzero(active))


def _task_data(scenario: Scenario, learner: Learner, t: int):
    if learner.config.method is Method.JOINT:  # the upper bound: everything seen so far
        tasks = scenario.tasks[: t + 1]
        return np.concatenate([k.x_train for k in tasks]), np.concatenate([k.y_train for k in tasks])
    return scenario.tasks[t].x_train, scenario.tasks[t].y_train


def _evaluate(scenario: Scenario, learner: Learner) -> tuple[list, list]:
    class_il, task_il = [], []
    for task in scenario.tasks:
        logits = learner.engine.evaluate(task.x_test)
        class_il.append(class_il_accuracy(logits, task.y_test))
        task_il.append(task_il_accuracy(logits, task.y_test, list(task.classes)))
    return class_il, task_il


def _batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [b for b in batches if len(b) >= 2]  # a last batch of one would break BatchNorm


def run_scenario(scenario: Scenario, learner: Learner, config: RunConfig = RunConfig(),
                 checkpoint_dir: str | Path | None = None, progress: bool = True, extra_config: dict | None = None,
                 ) -> RunResult:
    """Train `learner` on every task of `scenario` in order; evaluate all tasks after each.

    Args:
        scenario: the tasks. learner: strategy over an engine (and its buffer).
        config: epochs, batch size, seed, checkpoint cadence.
        checkpoint_dir: where to save and resume from (None: no checkpoints).
        progress: show a progress bar. extra_config: recorded in the result's `config`.
    Returns:
        RunResult with R[t][i] (accuracy on task i after task t) and the derived metrics.
    """
    from tqdm import tqdm

    T, E = scenario.n_tasks, config.epochs
    R = np.full((T, T), np.nan)
    R_task = np.full((T, T), np.nan)
    baseline = None
    pos = {"task": 0, "epoch": 0, "batch": 0, "task_begun": False, "epoch_begun": False, "wall_s": 0.0}
    resumed = False
    ckpt = load_checkpoint(checkpoint_dir, fallback=True) if checkpoint_dir is not None else None
    if ckpt is not None:
        learner.engine.load_state_arrays(ckpt.parts["engine"], f"checkpoint {ckpt.path}")
        if learner.buffer is not None:
            learner.buffer.load_state_arrays(ckpt.parts["buffer"])
        learner.load_state_arrays(ckpt.parts["learner"])
        R, R_task, baseline = ckpt.parts["loop"]["R"], ckpt.parts["loop"]["R_task"], ckpt.parts["loop"]["baseline"]
        pos = dict(ckpt.meta["position"])
        resumed = True
    if baseline is None:
        baseline = np.array(_evaluate(scenario, learner)[0])

    def checkpoint() -> None:
        if checkpoint_dir is None:
            return
        parts = {"engine": learner.engine.state_arrays(), "learner": learner.state_arrays(),
                 "loop": {"R": R, "R_task": R_task, "baseline": baseline}}
        if learner.buffer is not None:
            parts["buffer"] = learner.buffer.state_arrays()
        save_checkpoint(checkpoint_dir, parts, {"position": {**pos, "wall_s": pos["wall_s"] + time.perf_counter() - t0},
                                                "step": learner.step})

    steps_per_epoch = sum(len(k.x_train) for k in scenario.tasks) // (T * config.batch_size)
    bar = tqdm(total=T * E * max(1, steps_per_epoch), initial=learner.step, unit="step", disable=not progress,
               mininterval=0.5, desc=extra_config.get("label", "training") if extra_config else "training")
    t0 = time.perf_counter()
    while pos["task"] < T:
        t = pos["task"]
        x, y = _task_data(scenario, learner, t)
        if not pos["task_begun"]:
            learner.begin_task(t, len(x))
            pos.update(task_begun=True, epoch=0, batch=0, epoch_begun=False)
        while pos["epoch"] < E:
            if not pos["epoch_begun"]:
                learner.begin_epoch(pos["epoch"], E)
                pos.update(epoch_begun=True, batch=0)
            batches = _batches(epoch_order(config.seed, t, pos["epoch"], learner.active), config.batch_size)
            while pos["batch"] < len(batches):
                idx = batches[pos["batch"]]
                loss = learner.observe(x[idx], y[idx], idx)
                pos["batch"] += 1
                bar.update(1)
                bar.set_postfix(task=t + 1, epoch=pos["epoch"] + 1, loss=f"{loss:.3f}", refresh=False)
                if config.checkpoint_every and learner.step % config.checkpoint_every == 0:
                    checkpoint()
            pos.update(epoch=pos["epoch"] + 1, batch=0, epoch_begun=False)
        learner.end_task()
        R[t], R_task[t] = _evaluate(scenario, learner)
        pos.update(task=t + 1, epoch=0, batch=0, task_begun=False, epoch_begun=False)
        checkpoint()
    bar.close()
    wall = pos["wall_s"] + time.perf_counter() - t0
    return RunResult(
        acc_matrix=R.tolist(), task_il_matrix=R_task.tolist(), acc=average_accuracy(R),
        task_il_acc=average_accuracy(R_task), bwt=backward_transfer(R), forgetting=forgetting(R),
        fwt=forward_transfer(R, baseline), train_flops=learner.train_flops,
        dense_train_flops=learner.dense_train_flops, steps=learner.step, peak_rss_bytes=peak_rss_bytes(),
        wall_s=wall, resumed=resumed,
        config={"run": dataclasses.asdict(config), "strategy": learner.config.to_dict(), **(extra_config or {})})


def result_json(result: RunResult) -> str:
    return json.dumps(result.to_dict(), indent=2)
