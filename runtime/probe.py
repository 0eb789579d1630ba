"""A fresh runtime-only training process, timed and measured: cold start and peak memory.

The child is a new interpreter that uses only the standard library until it imports numpy
and `edgecl.runtime`; it opens the artifacts, trains `steps` SGD steps on one batch read from
a file and reports, as one `RESULT {json}` line, its times (time.monotonic(): one clock for
every process on Linux and macOS, so the parent subtracts its spawn time), its resident set
as a bare interpreter, after the imports and at its peak, and whether torch was ever imported.

`bench latency` / `bench memory` run it on the host (edgecl.bench.fresh_process), and the
board agent runs it on the board (`bench memory --device serial:PORT`), so both measure the
same process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

STATUS_SRC = textwrap.dedent("""
    def _status(field):
        # 'VmRSS:   1234 kB' from /proc/self/status, in bytes; None off Linux
        try:
            for line in open("/proc/self/status"):
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None

    def _peak():
        peak = _status("VmHWM")
        if peak is None:
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return peak
""")

# argv[1]: JSON {artifacts, batch (an .npz with x and y), steps, threads, lr}.
RUNTIME_CHILD_SRC = "import sys, time, json\n" + STATUS_SRC + textwrap.dedent("""
    cfg = json.loads(sys.argv[1])
    t_python = time.monotonic()
    rss_interpreter = _status("VmRSS")
    import numpy as np
    from edgecl.runtime import OptimizerConfig, open_engine
    t_imports = time.monotonic()
    rss_imports = _status("VmRSS")
    with np.load(cfg["batch"]) as z:
        x, y = z["x"], z["y"]
    engine = open_engine(cfg["artifacts"], OptimizerConfig("sgd", lr=cfg["lr"]), threads=cfg["threads"])
    t_open = time.monotonic()
    losses = [engine.step(x, y)]
    t_first = time.monotonic()
    losses += [engine.step(x, y) for _ in range(cfg["steps"] - 1)]
    t_end = time.monotonic()
""")

REPORT_SRC = textwrap.dedent("""
    print("RESULT " + json.dumps({
        "t_python": t_python, "t_imports": t_imports, "t_open": t_open, "t_first": t_first, "t_end": t_end,
        "rss_interpreter": rss_interpreter, "rss_imports": rss_imports, "rss_peak": _peak(),
        "torch_imported": "torch" in sys.modules, "losses": losses}))
""")

TIMES = ("t_python", "t_imports", "t_open", "t_first", "t_end")


def child_env() -> dict[str, str]:
    """This environment with OMP_WAIT_POLICY=PASSIVE unless set (idle threads sleep, as ORT's)."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def run_child(source: str, cfg: dict, python: str | None = None, timeout_s: float = 600.0,
              what: str = "runtime-only") -> dict:
    """Run `source` (a child program ending with REPORT_SRC) in a new interpreter.

    Returns:
        its report, with every time in TIMES turned into ms from the spawn.
    Raises:
        RuntimeError: the child failed or printed no report (the tail of its stderr is in the message).
    """
    argv = [python or sys.executable, "-c", source]
    spawn = time.monotonic()
    try:
        proc = subprocess.run(argv + [json.dumps(cfg)], capture_output=True, text=True, env=child_env(),
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the fresh {what} process ({argv[0]}) did not finish within {timeout_s:g} s") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"the fresh {what} process ({argv[0]}) failed with exit code {proc.returncode}: {tail}")
    report = json.loads(lines[-1][len("RESULT "):])
    for key in TIMES:
        report[key] = 1000.0 * (report[key] - spawn)
    return report


def probe_runtime(artifacts, batch_file, steps: int, threads: int | None, lr: float = 0.03,
                  python: str | None = None, timeout_s: float = 600.0, what: str = "runtime-only") -> dict:
    """Train `steps` steps of the artifacts' engine on `batch_file` in a fresh runtime-only process.

    Returns:
        the child's report: times in ms from the spawn (TIMES), "rss_interpreter", "rss_imports",
        "rss_peak" (bytes), "torch_imported", "losses".
    Raises:
        ValueError: steps < 1 or threads < 1. RuntimeError: the child failed.
    """
    if steps < 1 or (threads is not None and threads < 1):
        raise ValueError(f"steps={steps}, threads={threads}; accepted: both >= 1")
    cfg = {"artifacts": str(artifacts), "batch": str(batch_file), "steps": steps, "threads": threads, "lr": lr}
    return run_child(RUNTIME_CHILD_SRC + REPORT_SRC, cfg, python, timeout_s, what)
