"""An app killed (SIGKILL) at any moment of `learn` or `save`, then reopened, continues exactly as
an uninterrupted run: real processes, killed at random times and at every durable write of a save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import TIME_SCALE
from tests.runtime.test_online import assert_same_state, run_stream

ROOT = Path(__file__).resolve().parents[2]
# the repository for `tests.*`, after what the environment already puts first (the emulated board's site)
PYTHONPATH = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))
N = 240
SETTINGS = {"method": "derpp", "sparsity": 0.75, "tdm_every": 7, "budget": "2MiB", "buffer": 60, "replay_steps": 1}

# The app: opens the state, learns the stream from where it stands, saves every 2 calls. With
# KILL_AT_FSYNC=k it SIGKILLs itself at its k-th fsync (a save's log, parts, meta, folder, LATEST).
APP = textwrap.dedent("""
    import os, signal, sys
    sys.modules["torch"] = None
    kill_at = int(os.environ.get("KILL_AT_FSYNC", "0"))
    if kill_at:
        real_fsync, fsyncs = os.fsync, [0]
        def fsync(fd):
            fsyncs[0] += 1
            if fsyncs[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            real_fsync(fd)
        os.fsync = fsync
    from edgecl.runtime.online import open_learner
    from tests.runtime.test_online import groups, stream
    artifacts, state, n, settings = sys.argv[1], sys.argv[2], int(sys.argv[3]), eval(sys.argv[4])
    x, y = stream(n)
    with open_learner(artifacts, state, threads=1, **settings) as learner:
        print("open", learner.samples_seen, flush=True)
        calls = [c for c in groups(n) if c[0] >= learner.samples_seen]
        for i, (lo, hi) in enumerate(calls):
            learner.learn(x[lo:hi], y[lo:hi])
            if i % 2 == 1:
                learner.save()
        learner.save()
    print("done", flush=True)
""")


def app(artifacts, state, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", APP, str(artifacts), str(state), str(N), repr(SETTINGS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": PYTHONPATH, **(env or {})})


@pytest.fixture
def cnn(exported):
    return exported("cnn")[1]


def test_sigkill_at_random_moments_then_reopen_equals_an_uninterrupted_run(cnn, tmp_path):
    whole = run_stream(cnn, tmp_path / "whole", n=N, **SETTINGS)
    rng = np.random.default_rng(0)
    state, killed_mid_stream = tmp_path / "killed", 0
    for _ in range(4):
        proc = app(cnn, state)
        line = proc.stdout.readline()
        assert line.startswith("open"), proc.stderr.read()
        time.sleep(float(rng.uniform(0.0, 0.4)) * TIME_SCALE)
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=120 * TIME_SCALE)
        killed_mid_stream += "done" not in out
    assert killed_mid_stream >= 1, "every app finished before its kill: lengthen the stream"
    assert_same_state(run_stream(cnn, state, n=N, **SETTINGS), whole)


def test_sigkill_at_each_durable_write_of_a_save_then_reopen_equals_an_uninterrupted_run(cnn, tmp_path):
    whole = run_stream(cnn, tmp_path / "whole", n=N, **SETTINGS)
    points = range(1, 25, 2) if TIME_SCALE == 1 else range(1, 25, 6)
    for k in points:
        state = tmp_path / f"kill-{k}"
        proc = app(cnn, state, {"KILL_AT_FSYNC": str(k)})
        out, err = proc.communicate(timeout=300 * TIME_SCALE)
        assert proc.returncode == -signal.SIGKILL, f"fsync {k}: exit {proc.returncode}\n{err[-2000:]}"
        assert_same_state(run_stream(cnn, state, n=N, **SETTINGS), whole)
