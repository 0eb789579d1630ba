"""The host's part before a fleet run: the devices' streams, the test set and `fleet.json` in a run folder."""

from __future__ import annotations

import json
from pathlib import Path

from edgecl.runtime.dataset import Dataset
from edgecl.runtime.files import write_atomic
from edgecl.runtime.manifest import load_manifest

from .client import ClientPaths
from .config import FleetConfig
from .scenario import dirichlet_fleet, write_client_files
from .server import RUN_FILE


def client_paths(run_dir: str | Path, partition: int, artifacts: str | Path) -> ClientPaths:
    """Where device `partition` of a run folder keeps its stream and state."""
    run_dir = Path(run_dir)
    return ClientPaths(run_dir / "data" / f"client-{partition}.npz", run_dir / "state" / f"client-{partition}",
                       Path(artifacts))


def prepare_run(config: FleetConfig, train: Dataset, test: Dataset, artifacts: str | Path, run_dir: str | Path,
                mode: str) -> Path:
    """Split the data (`scenario.dirichlet_fleet`), write every device's stream and `fleet.json`.

    Raises:
        ValueError: the export does not take the data's samples or classes (names both), or the
            run folder already holds a run (a state folder a new run must not resume).
    """
    manifest = load_manifest(artifacts)
    if tuple(manifest.input_shape) != tuple(train.x.shape[1:]) or manifest.num_classes < train.num_classes:
        raise ValueError(f"the export at {str(artifacts)!r} takes {tuple(manifest.input_shape)} with "
                         f"{manifest.num_classes} classes; the data has {tuple(train.x.shape[1:])} with "
                         f"{train.num_classes}; accepted: an export for this data set")
    run_dir = Path(run_dir)
    if (run_dir / RUN_FILE).exists():
        raise ValueError(f"{str(run_dir)!r} already holds a fleet run; accepted: a new or empty folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    scenario = dirichlet_fleet(train, test, config.clients, config.tasks, config.alpha, config.seed)
    write_client_files(scenario, run_dir / "data")
    (run_dir / "state").mkdir(exist_ok=True)
    run = {"config": config.to_dict(), "artifacts": str(Path(artifacts).resolve()), "mode": mode,
           "task_classes": [list(c) for c in scenario.task_classes], "devices": scenario.summary()}
    write_atomic(run_dir / RUN_FILE, json.dumps(run, indent=1))
    return run_dir
