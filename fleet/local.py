"""`edgecl fleet local`: a real Flower deployment on localhost, one process per device.

A SuperLink (`flower-superlink`) and one SuperNode (`flower-supernode`) per device are started as
processes; each SuperNode's node config names its own stream, state folder and the exported model
(`client.paths_from_node_config`). The run is submitted with `flwr run` as a Flower App (a small
app folder written into the run folder: its components are `edgecl.fleet.server:app` and
`edgecl.fleet.client:app`), followed with `flwr ls` until it finishes, and everything is shut down,
child processes included (SuperExec, `flwr-serverapp`, `flwr-clientapp`).

Isolation: every component gets its own FLWR_HOME (Flower installs the app into it, and two
installs into one folder race) and the CLI a config file naming the SuperLink; all of them live
in the run folder's `deployment/`, so nothing is written to the user's ~/.flwr. Telemetry and the
update check are off; the SuperLink does not install the app's dependencies (they are this
environment's).

Measured with flwr 1.42 on 2 cores: SuperNodes are online 5-8 s after the start, and a round takes
at least ~6 s whatever the work (the SuperNodes and the ServerApp poll every 3 s).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .prepare import client_paths
from .server import PROGRESS_FILE, RESULT_FILE, read_run

CONNECTION = "edgecl"
APP_PYPROJECT = """[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "edgecl-fleet"
version = "1.0.0"
description = "edgecl's federated continual learning (the code is the installed edgecl package)"
dependencies = []

[tool.flwr.app]
publisher = "edgecl"

[tool.flwr.app.components]
serverapp = "edgecl.fleet.server:app"
clientapp = "edgecl.fleet.client:app"

[tool.flwr.app.config]
run-dir = ""
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().decode(errors="replace").rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().split(b")")[-1].split()[0] != b"Z"
    except OSError:
        return False


class LocalFleet:
    """A SuperLink and `clients` SuperNodes on localhost for the run folder `run_dir`; a context
    manager that shuts every process down on exit."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir).resolve()
        run = read_run(self.run_dir)
        self.clients, self.artifacts = run["config"].clients, run["artifacts"]
        self.root = self.run_dir / "deployment"
        self.root.mkdir(exist_ok=True)
        self.bin = Path(sys.executable).parent
        self.env = dict(os.environ, HOME=str(self.root / "home"), FLWR_TELEMETRY_ENABLED="0",
                        FLWR_DISABLE_UPDATE_CHECK="1", FLWR_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1",
                        OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
                        PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}")
        (self.root / "home").mkdir(exist_ok=True)
        self.link_port = free_port()
        self.node_ports: dict[int, int] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.trees: dict[str, set[int]] = {}
        cli_home = self.root / "flwr-cli"
        cli_home.mkdir(exist_ok=True)
        (cli_home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                              f'address = "127.0.0.1:{self.link_port}"\ninsecure = true\n')
        self.cli_env = dict(self.env, FLWR_HOME=str(cli_home))
        self.app_dir = self.root / "app"
        self.app_dir.mkdir(exist_ok=True)
        (self.app_dir / "pyproject.toml").write_text(APP_PYPROJECT)

    # --- processes ---------------------------------------------------------------------
    def _start(self, name: str, argv: list[str]) -> None:
        home = self.root / f"flwr-{name}"
        home.mkdir(exist_ok=True)
        with open(self.root / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, env=dict(self.env, FLWR_HOME=str(home)), cwd=self.root, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name], self.trees[name] = proc, {proc.pid}

    def start_superlink(self) -> None:
        self._start("superlink", [str(self.bin / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                                  str(self.link_port), "--disable-runtime-dependency-installation"])

    def start_node(self, partition: int) -> None:
        """Start (or restart, same port and files) the SuperNode of device `partition`."""
        port = self.node_ports.setdefault(partition, free_port())
        paths = client_paths(self.run_dir, partition, self.artifacts)
        node_config = (f'partition-id={partition} num-partitions={self.clients} data-file="{paths.data_file}" '
                       f'state-dir="{paths.state_dir}" artifacts="{paths.artifacts}"')
        self._start(f"node-{partition}", [str(self.bin / "flower-supernode"), "--insecure", "--superlink",
                                          f"127.0.0.1:{self.link_port}", "--host", "127.0.0.1", "--port", str(port),
                                          "--node-config", node_config])

    def _refresh(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                self.trees[name] |= _descendants(proc.pid)

    def kill_node(self, partition: int) -> None:
        """SIGKILL device `partition`'s SuperNode and everything it started (its ClientApp too)."""
        name = f"node-{partition}"
        self._refresh()
        for pid in self.trees[name] | _descendants(self.procs[name].pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs[name].wait(timeout=10)  # reaped: a zombie parent would keep its children waiting

    def shutdown(self, grace_s: float = 10.0) -> None:
        """SIGTERM the SuperNodes, then the SuperLink; SIGKILL whatever is left after `grace_s`."""
        self._refresh()
        for name in sorted(self.procs, key=lambda n: n == "superlink"):
            if self.procs[name].poll() is None:
                self.procs[name].send_signal(signal.SIGTERM)
        pids = set().union(*self.trees.values()) if self.trees else set()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            for proc in self.procs.values():
                proc.poll()
            time.sleep(0.1)
        for pid in pids:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # --- the Flower CLI ----------------------------------------------------------------
    def _cli(self, *args: str, timeout_s: float = 120.0) -> dict:
        proc = subprocess.run([str(self.bin / "flwr"), *args, "--format", "json"], env=self.cli_env, cwd=self.root,
                              capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        try:
            out = json.loads(proc.stdout)
        except json.JSONDecodeError:
            raise RuntimeError(f"flwr {' '.join(args)} exited {proc.returncode}: {proc.stdout[-500:]} "
                               f"{proc.stderr[-500:]}") from None
        if out.get("success") is False:
            raise RuntimeError(f"flwr {' '.join(args)} failed: {out.get('error-message', out)}")
        return out

    def wait_nodes(self, timeout_s: float = 120.0) -> None:
        """Wait until every SuperNode is online at the SuperLink."""
        deadline, online = time.monotonic() + timeout_s, 0
        while time.monotonic() < deadline:
            if self.procs["superlink"].poll() is not None:
                raise RuntimeError(f"the SuperLink exited: see {self.root / 'superlink.log'}")
            try:
                nodes = self._cli("supernode", "ls", CONNECTION, timeout_s=30).get("nodes", [])
                online = sum(1 for n in nodes if n.get("status") == "online")
            except RuntimeError:
                online = 0  # the SuperLink is still starting
            if online >= self.clients:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{online} of {self.clients} SuperNodes online after {timeout_s:g} s: see {self.root}")

    def submit(self) -> str:
        """`flwr run` of the fleet app on this run folder; returns the run id."""
        out = self._cli("run", str(self.app_dir), CONNECTION, "-c", f"run-dir={json.dumps(str(self.run_dir))}")
        return str(out["run-id"])

    def status(self, run_id: str) -> str:
        return str(self._cli("ls", CONNECTION, "--run-id", run_id)["runs"][0]["status"])

    def wait(self, run_id: str, on_round=None, timeout_s: float = 7200.0) -> str:
        """Follow the run until Flower says it finished; on_round(round, row) from `progress.json`."""
        deadline, done = time.monotonic() + timeout_s, 0
        while time.monotonic() < deadline:
            status = self.status(run_id)
            progress = self.run_dir / PROGRESS_FILE
            if on_round is not None and progress.is_file():
                try:
                    p = json.loads(progress.read_text())
                except json.JSONDecodeError:
                    p = {"rounds_done": done}
                if p["rounds_done"] > done:
                    done = p["rounds_done"]
                    on_round(done, p["last"])
            if status.startswith("finished"):
                return status
            time.sleep(1.0)
        raise TimeoutError(f"run {run_id} did not finish within {timeout_s:g} s")


def run_local(run_dir: str | Path, on_round=None) -> dict:
    """Run the prepared fleet in `run_dir` as a localhost deployment; returns the result.

    Raises:
        RuntimeError: a component failed to start, or the run ended without a result (names the logs).
    """
    run_dir = Path(run_dir).resolve()
    (run_dir / RESULT_FILE).unlink(missing_ok=True)
    with LocalFleet(run_dir) as fleet:
        fleet.start_superlink()
        for k in range(fleet.clients):
            fleet.start_node(k)
        fleet.wait_nodes()
        status = fleet.wait(fleet.submit(), on_round)
    path = run_dir / RESULT_FILE
    if not path.is_file():
        raise RuntimeError(f"the deployment ended {status!r} without {RESULT_FILE}: see the logs in "
                           f"{run_dir / 'deployment'} (flwr log <run-id>)")
    return json.loads(path.read_text())
