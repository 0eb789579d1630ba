"""Which settings a checkpoint must share with a run to resume it: the run's identity, compared field by field.

Every checkpoint of `run_scenario` records `run_identity(...)`: the schedule, the strategy,
the engine and its optimizer, the replay buffer's geometry, a fingerprint of the scenario's
data, and the caller's `job` (the whole JobConfig of `edgecl run`, the TrainSpec of the
board agent). Resuming under other settings would continue one run with another's and label
the mixture with the new settings, so `refuse_other_settings` refuses it, naming each field
that differs with both values.

RESUME_FREE holds the fields a resume may change: `checkpoint_every` only. A checkpoint holds
the exact state, so where they fall does not change the metrics. `threads` is checked:
ONNX Runtime may split a reduction differently over another number of threads, and the
resumed run would then end with no uninterrupted run's metrics, not even its own setting's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from enum import Enum
from pathlib import Path

import numpy as np

from .checkpoint import check_checkpoint_root, load_checkpoint
from .errors import ArtifactError, CheckpointFormatError, ConfigMismatchError

RESUME_FREE = ("checkpoint_every",)
_ABSENT = "(absent)"


def run_identity(scenario, learner, config, job: dict | None = None) -> dict:
    """The settings a checkpoint of this run records and a resume must match, as plain JSON values.

    Args:
        scenario: the Scenario. learner: the Learner (strategy, engine, buffer).
        config: the RunConfig. job: the caller's whole job description (a dataclass's dict),
            or None.
    """
    buffer = learner.buffer
    identity = {
        "run": _without_free(dataclasses.asdict(config)),
        "strategy": learner.config.to_dict(),
        "engine": {"name": learner.engine.name, "model": learner.engine.manifest.model_name,
                   "optimizer": learner.engine.optimizer_config.to_dict()},
        "buffer": None if buffer is None else {"capacity": buffer.capacity, "store_logits": buffer.store_logits},
        "scenario": scenario_fingerprint(scenario),
        "job": None if job is None else _without_free(job),
    }
    return _plain(identity)


def scenario_fingerprint(scenario) -> dict:
    """Name, kind, classes of each task and the sha256 of every example and label (dtype, shape and bytes)."""
    h = hashlib.sha256()
    for task in scenario.tasks:
        for a in (task.x_train, task.y_train, task.x_test, task.y_test):
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(memoryview(a).cast("B"))
    return {"name": scenario.name, "kind": scenario.kind.value, "num_classes": scenario.num_classes,
            "classes": [list(task.classes) for task in scenario.tasks], "sha256": h.hexdigest()}


def config_differences(saved: dict, now: dict) -> list[str]:
    """"field: <value> in the checkpoint, <value> now" for each field of two identities that differs.

    Nested fields are named with dots (`scenario.sha256`), the job's without a prefix
    (`epochs`). When the jobs differ only their fields are listed: the rest follows from the job.
    """
    saved_flat, now_flat = _flat(saved), _flat(now)
    keys = list(now_flat) + [k for k in saved_flat if k not in now_flat]
    differ = [k for k in keys if not _same(saved_flat.get(k, _ABSENT), now_flat.get(k, _ABSENT))]
    if any(k.startswith("job.") for k in differ):
        differ = [k for k in differ if k.startswith("job.")]
    return [f"{k.removeprefix('job.')}: {_show(saved_flat.get(k, _ABSENT))} in the checkpoint, "
            f"{_show(now_flat.get(k, _ABSENT))} now" for k in differ]


def refuse_other_settings(where: str | Path, saved: dict, now: dict) -> None:
    """Raise ConfigMismatchError, naming each differing field, if identity `saved` (from a checkpoint) is not `now`."""
    differences = config_differences(saved, now)
    if differences:
        raise ConfigMismatchError(f"checkpoint {where} was written by a run with other settings: "
                                  f"{'; '.join(differences)}; accepted: the same settings (the run resumes), or "
                                  "another checkpoint folder (or this one emptied) to start anew", differences)


def check_resume(checkpoint_dir: str | Path, job: dict) -> None:
    """Refuse up front, before data or artifacts are loaded, to resume `checkpoint_dir` under another `job`.

    Compares `job` with the job recorded in the checkpoint `run_scenario` would resume (the
    newest that verifies; warnings are left to `run_scenario`, which checks the whole
    identity again). A folder that does not exist or holds no checkpoint passes.

    Raises:
        ValueError: `checkpoint_dir` is a file. ConfigMismatchError: another job (names each
        field). CheckpointFormatError: a checkpoint of another edgecl version.
    """
    root = Path(checkpoint_dir)
    check_checkpoint_root(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            ckpt = load_checkpoint(root, fallback=True)
        except CheckpointFormatError:
            raise
        except ArtifactError:
            return  # nothing verifies: run_scenario says so, with every reason
    saved = ckpt.meta.get("config") if ckpt is not None else None
    if isinstance(saved, dict):
        refuse_other_settings(ckpt.path, {"job": saved.get("job")}, {"job": _plain(_without_free(job))})


def _without_free(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if k not in RESUME_FREE}


def _plain(value):
    """`value` as JSON gives it back: tuples as lists, enums and numpy scalars as their values."""
    if isinstance(value, Enum):
        return _plain(value.value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot record {type(value).__name__} {value!r} in a run's identity")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _same(a, b) -> bool:
    return a == b and isinstance(a, bool) == isinstance(b, bool)  # True == 1 in Python, not here


def _show(value) -> str:
    return value if value is _ABSENT else repr(value)
