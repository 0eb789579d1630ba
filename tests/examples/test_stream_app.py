"""examples/stream_app.py, as a board runs it: without torch, killed with SIGKILL mid-stream, restarted."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgecl.runtime import open_learner
from tests.helpers import TIME_SCALE
from tests.runtime.test_online import assert_same_state, state_of, stream

ROOT = Path(__file__).resolve().parents[2]
# the repository for `tests.*`, after what the environment already puts first (the emulated board's site)
PYTHONPATH = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))
STOCK_PYTHON = ROOT / ".venv-stock-ort" / "bin" / "python"  # the torch-free environment of ./bootstrap.sh test
N = 1200
RUN = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
       "runpy.run_path(sys.argv[0], run_name='__main__')")


def app(*args) -> subprocess.Popen:
    # natively the stock-onnxruntime venv; on the emulated board its own interpreter (torch-free already)
    python = STOCK_PYTHON if STOCK_PYTHON.exists() and platform.machine() == "x86_64" else Path(sys.executable)
    return subprocess.Popen([str(python), "-c", RUN, str(ROOT / "examples" / "stream_app.py"), *map(str, args),
                             "--report", "200"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": PYTHONPATH})


@pytest.fixture
def class_incremental_stream(tmp_path):
    x, y = stream(N)
    order = np.argsort(y // 2, kind="stable")  # classes arrive two at a time
    path = tmp_path / "stream.npz"
    np.savez(path, x=x[order], y=y[order])
    return path


def test_the_app_survives_sigkill_and_ends_as_an_uninterrupted_run(exported, tmp_path, class_incremental_stream):
    _, artifacts = exported("cnn")
    whole = app(artifacts, tmp_path / "whole", class_incremental_stream)
    out, err = whole.communicate(timeout=300 * TIME_SCALE)
    assert whole.returncode == 0, err[-3000:]
    lines = out.splitlines()
    assert lines[0].startswith(f"state {tmp_path / 'whole'}: 0 of {N} samples learned before")
    accuracies = [float(line.split("online accuracy ")[1].split()[0]) for line in lines if "online accuracy" in line]
    assert len(accuracies) >= 5 and max(accuracies) > 0.6  # it learns each new pair of classes as they come
    assert f"{N}/{N}  accuracy now over all {N} samples" in lines[-1]
    assert float(lines[-1].split()[-1]) > 0.5  # the first classes are not forgotten
    assert "torch" not in err

    killed = app(artifacts, tmp_path / "killed", class_incremental_stream)
    for line in killed.stdout:  # kill once it has reported progress (and so saved at least once)
        if "online accuracy" in line:
            break
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60 * TIME_SCALE)
    assert killed.returncode == -signal.SIGKILL
    again = app(artifacts, tmp_path / "killed", class_incremental_stream)
    out, err = again.communicate(timeout=300 * TIME_SCALE)
    assert again.returncode == 0, err[-3000:]
    resumed_from = int(out.splitlines()[0].split(": ")[1].split(" of ")[0])
    assert 0 < resumed_from < N
    settings = {"method": "derpp", "sparsity": None, "budget": "8MiB", "lr": 0.1, "replay_steps": 1}  # the example's
    with open_learner(artifacts, tmp_path / "whole", **settings) as a, \
            open_learner(artifacts, tmp_path / "killed", **settings) as b:
        assert_same_state(state_of(b), state_of(a))
