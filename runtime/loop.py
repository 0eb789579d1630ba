"""The continual-learning loop: tasks -> epochs -> batches, evaluation after every task, checkpoints.

`run_scenario` trains a `Learner` on a `Scenario` and returns a `RunResult` with the
accuracy matrix and every metric. With a checkpoint folder it saves the whole state at task
ends and every N steps, and a run killed at any moment resumes from the last checkpoint
and ends with exactly the metrics of an uninterrupted run (same seed): the order of every
epoch is a pure function of (seed, task, epoch), and every other random draw comes from a
generator whose state is in the checkpoint. A checkpoint is resumed only under the settings
that wrote it (`edgecl.runtime.resume`), and only if its position is one this run can be at.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from .budget import peak_rss_bytes
from .checkpoint import Checkpoint, CheckpointWriter, load_checkpoint
from .errors import ArtifactError
from .metrics import average_accuracy, backward_transfer, class_il_accuracy, forgetting, forward_transfer, task_il_accuracy
from .resume import refuse_other_settings, run_identity
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
                 checkpoint_dir: str | Path | CheckpointWriter | None = None, progress: bool = True,
                 extra_config: dict | None = None,
                 ) -> RunResult:
    """Train `learner` on every task of `scenario` in order; evaluate all tasks after each.

    Args:
        scenario: the tasks. learner: strategy over an engine (and its buffer).
        config: epochs, batch size, seed, checkpoint cadence.
        checkpoint_dir: where to save and resume from (None: no checkpoints); locked for the
            whole run, or a CheckpointWriter the caller holds (and closes), so that a caller can
            hold the folder from before its own set-up (`edgecl run` locks it before the export). Every checkpoint records the run's settings (`resume.run_identity`); one
            that is unreadable, or whose position this run cannot be at, is passed over for the
            older one with a warning.
        progress: show a progress bar. extra_config: recorded in the result's `config`; its
            "job" (the caller's whole job description) is part of the settings a resume must match.
    Returns:
        RunResult with R[t][i] (accuracy on task i after task t) and the derived metrics.
    Raises:
        ConfigMismatchError: the checkpoint was written under other settings (names each field).
        FolderBusyError: another process writes checkpoints into `checkpoint_dir`.
        ArtifactError: no checkpoint in `checkpoint_dir` verifies.
    """
    if checkpoint_dir is None or isinstance(checkpoint_dir, CheckpointWriter):
        return _run(scenario, learner, config, checkpoint_dir, progress, extra_config)
    with CheckpointWriter(checkpoint_dir) as writer:
        return _run(scenario, learner, config, writer, progress, extra_config)


def _run(scenario: Scenario, learner: Learner, config: RunConfig, writer: CheckpointWriter | None, progress: bool,
         extra_config: dict | None) -> RunResult:
    from tqdm import tqdm

    T, E = scenario.n_tasks, config.epochs
    R = np.full((T, T), np.nan)
    R_task = np.full((T, T), np.nan)
    baseline = None
    pos = {"task": 0, "epoch": 0, "batch": 0, "task_begun": False, "epoch_begun": False, "wall_s": 0.0}
    resumed = False
    identity = run_identity(scenario, learner, config, (extra_config or {}).get("job")) if writer else None
    ckpt = (load_checkpoint(writer.root, fallback=True,
                            check=lambda c: _check_resumable(c, identity, scenario, learner, config))
            if writer else None)
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
        if writer is None:
            return
        parts = {"engine": learner.engine.state_arrays(), "learner": learner.state_arrays(),
                 "loop": {"R": R, "R_task": R_task, "baseline": baseline}}
        if learner.buffer is not None:
            parts["buffer"] = learner.buffer.state_arrays()
        writer.save(parts, {"position": {**pos, "wall_s": pos["wall_s"] + time.perf_counter() - t0},
                            "step": learner.step, "config": identity})

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


_POSITION = {"task": int, "epoch": int, "batch": int, "task_begun": bool, "epoch_begun": bool, "wall_s": float}
_ACCEPTED = {int: "an integer", bool: "true or false", float: "seconds >= 0"}


def _is_a(value, kind: type) -> bool:
    if kind is bool or isinstance(value, bool):  # JSON true is no number here, 1 no boolean
        return kind is bool and isinstance(value, bool)
    if kind is int:
        return isinstance(value, int)
    return isinstance(value, (int, float)) and 0 <= value < float("inf")


def _check_resumable(ckpt: Checkpoint, identity: dict, scenario: Scenario, learner: Learner,
                     config: RunConfig) -> None:
    """Refuse a checkpoint of other settings; any other fault of its meta or parts is an ArtifactError.

    An ArtifactError makes `load_checkpoint` fall back to the older checkpoint. Nothing is
    restored here: the checks read the checkpoint's arrays only.

    Raises:
        ConfigMismatchError: written under other settings (never fallen back from: the older
            checkpoints of the folder were written by the same run).
        ArtifactError: no recorded settings, a position that is malformed or out of this run's
            range, missing or misshapen parts, or a learner state that disagrees with the position.
    """
    where, meta, T, E = ckpt.path / "meta.json", ckpt.meta, scenario.n_tasks, config.epochs
    if not isinstance(meta.get("config"), dict):
        raise ArtifactError(f"{where} records no run settings ('config'); accepted: a checkpoint of run_scenario")
    refuse_other_settings(ckpt.path, meta["config"], identity)
    pos = meta.get("position")
    if not isinstance(pos, dict) or set(pos) != set(_POSITION):
        raise ArtifactError(f"{where}: position {pos!r}; accepted: a dict of {', '.join(_POSITION)}")
    for key, kind in _POSITION.items():
        if not _is_a(pos[key], kind):
            raise ArtifactError(f"{where}: position {key}={pos[key]!r}; accepted: {_ACCEPTED[kind]}")
    t, e, b, task_begun, epoch_begun = (pos[k] for k in ("task", "epoch", "batch", "task_begun", "epoch_begun"))
    rules = [(0 <= t <= T, f"0 <= task <= {T}"), (0 <= e < E, f"0 <= epoch < {E}"), (b >= 0, "batch >= 0"),
             (task_begun or (e, b, epoch_begun) == (0, 0, False), "epoch 0, batch 0 until a task begins"),
             (epoch_begun or b == 0, "batch 0 until an epoch begins"), (t < T or not task_begun, f"no task {T}")]
    broken = [rule for ok, rule in rules if not ok]
    if broken:
        raise ArtifactError(f"{where}: position {pos}; accepted: {', '.join(broken)}")
    needed = {"engine", "learner", "loop"} | ({"buffer"} if learner.buffer is not None else set())
    if set(ckpt.parts) != needed:
        raise ArtifactError(f"{ckpt.path} holds parts {sorted(ckpt.parts)}; accepted: {sorted(needed)}")
    loop = ckpt.parts["loop"]
    shapes = {"R": (T, T), "R_task": (T, T), "baseline": (T,)}
    if any(name not in loop or loop[name].shape != shape or loop[name].dtype.kind != "f"
           for name, shape in shapes.items()):
        raise ArtifactError(f"{ckpt.path}/loop.npz: {({k: (v.dtype.str, v.shape) for k, v in loop.items()})}; "
                            f"accepted: float arrays R {(T, T)}, R_task {(T, T)}, baseline {(T,)}")
    evaluated = ~np.isnan(loop["R"]).all(axis=1)
    if not (evaluated[:t].all() and not evaluated[t:].any()):
        raise ArtifactError(f"{ckpt.path}/loop.npz: accuracies after tasks {np.flatnonzero(evaluated).tolist()}; "
                            f"accepted: after tasks {list(range(t))}, as position task={t} says")
    _check_learner_state(ckpt, pos, meta.get("step"), scenario, learner, config)


def _check_learner_state(ckpt: Checkpoint, pos: dict, step, scenario: Scenario, learner: Learner,
                         config: RunConfig) -> None:
    where = ckpt.path / "learner.npz"
    try:
        state = json.loads(ckpt.parts["learner"]["learner::meta"].tobytes().decode())
        task, learner_step = state["task"], state["step"]
    except (KeyError, TypeError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{where} has no readable learner::meta ({type(e).__name__}: {e})") from e
    t = pos["task"]
    if task != (t if pos["task_begun"] else t - 1) or learner_step != step:
        raise ArtifactError(f"{where}: learner at task {task}, step {learner_step}; the meta's position task={t} "
                            f"(task_begun={pos['task_begun']}), step={step} disagree")
    if not pos["epoch_begun"]:
        return
    active = ckpt.parts["learner"].get("learner::active")
    tasks = scenario.tasks[: t + 1] if learner.config.method is Method.JOINT else [scenario.tasks[t]]  # _task_data
    size = sum(len(k.y_train) for k in tasks)
    if active is None or active.dtype != bool or active.shape != (size,):
        raise ArtifactError(f"{where}: learner::active {None if active is None else (active.dtype.str, active.shape)}"
                            f"; accepted: bool ({size},), task {t}'s examples")
    n = len(_batches(epoch_order(config.seed, t, pos["epoch"], active), config.batch_size))
    if pos["batch"] > n:
        raise ArtifactError(f"{ckpt.path / 'meta.json'}: position batch={pos['batch']}; accepted: <= {n}, the "
                            f"batches of task {t} epoch {pos['epoch']}")


def result_json(result: RunResult) -> str:
    return json.dumps(result.to_dict(), indent=2)
