"""`edgecl fleet simulate`: a fleet on Flower's simulation engine, every device a virtual SuperNode.

The ServerApp runs in this process; the ClientApps run in the engine's workers (Ray actors, one
CPU each), each device on its own stream and state folder in the run folder (`prepare.client_paths`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from flwr.simulation import run_simulation

from .client import make_client_app
from .prepare import client_paths
from .server import RESULT_FILE, make_server_app, read_run

# One ONNX Runtime thread per device and numpy's BLAS kept to one: the engine's workers share the cores.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
              "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}  # no GPUs: Ray's notice about their variable, silenced


QUIET = ("run_simulation` function is deprecated", "fraction_evaluate is set to 0.0")


class _Quiet(logging.Filter):
    """Flower's per-round INFO lines (the progress bar says it), its notice that `run_simulation` is
    deprecated in favour of `flwr run` (a library call needs the Python entry point; `fleet local`
    goes through `flwr run`), and that devices do not evaluate (the server does, on every task)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO and not any(q in record.getMessage() for q in QUIET)


def _resolver(run_dir: Path, artifacts: str):
    def resolve(context):
        return client_paths(run_dir, int(context.node_config["partition-id"]), artifacts)
    return resolve


def simulate(run_dir: str | Path, workers: int | None = None, on_round=None, verbose: bool = False) -> dict:
    """Run the prepared fleet in `run_dir` on Flower's simulation engine; returns the result.

    Args:
        run_dir: a folder `prepare.prepare_run` wrote. workers: devices trained at once (None: the
            CPU count). on_round: called after each round (`server.run_fleet`).
    Raises:
        RuntimeError: the simulation ended without a result (a server error; its log says why).
    """
    run_dir = Path(run_dir).resolve()
    run = read_run(run_dir)
    config = run["config"]
    cpus = workers or os.cpu_count() or 1
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": logging.ERROR}}
    client = make_client_app(_resolver(run_dir, run["artifacts"]))
    server = make_server_app(run_dir, on_round)
    (run_dir / RESULT_FILE).unlink(missing_ok=True)
    logger, quiet = logging.getLogger("flwr"), _Quiet()
    if not verbose:
        logger.addFilter(quiet)
    # Ray writes PYTHONPATH, PYTHONBREAKPOINT and its own variables into this process's environment
    # (for its workers), and the workers need WORKER_ENV: the caller gets its environment back.
    saved = dict(os.environ)
    os.environ.update(WORKER_ENV)
    try:
        run_simulation(server_app=server, client_app=client, num_supernodes=config.clients, backend_config=backend,
                       verbose_logging=verbose)
    finally:
        logger.removeFilter(quiet)
        os.environ.clear()
        os.environ.update(saved)
    path = run_dir / RESULT_FILE
    if not path.is_file():
        raise RuntimeError(f"the simulation in {str(run_dir)!r} ended without {RESULT_FILE}: see its log above")
    return json.loads(path.read_text())
