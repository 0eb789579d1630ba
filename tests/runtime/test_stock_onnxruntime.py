"""The portable graphs run on the newest stock onnxruntime (what a board installs), not only on 1.19.2."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgecl.runtime import open_engine
from tests.helpers import rel_err

STOCK_PYTHON = Path(__file__).resolve().parents[2] / ".venv-stock-ort" / "bin" / "python"

SCRIPT = """
import json, sys
import numpy as np, onnxruntime
from importlib.metadata import distributions
from edgecl.runtime import open_engine
engine = open_engine(sys.argv[1], threads=1)
rng = np.random.default_rng(0)
x = rng.random((16, 1, 8, 8), dtype=np.float32)
y = rng.integers(0, 10, 16)
losses = [engine.step(x, y) for _ in range(5)]
names = sorted(d.metadata["Name"].lower() for d in distributions())
print(json.dumps({"ort": onnxruntime.__version__, "losses": losses, "dists": names}))
"""


@pytest.mark.ort_training  # compares with the training build in this process
@pytest.mark.skipif(not STOCK_PYTHON.exists(), reason="no .venv-stock-ort: ./bootstrap.sh test creates it")
@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_portable_engine_on_stock_onnxruntime_matches(exported, name):
    _, folder = exported(name)
    out = subprocess.run([str(STOCK_PYTHON), "-c", SCRIPT, str(folder)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    stock = json.loads(out.stdout.strip().splitlines()[-1])
    assert "onnxruntime" in stock["dists"] and "onnxruntime-training-cpu" not in stock["dists"]
    assert "torch" not in stock["dists"]
    assert stock["ort"] != "1.19.2"
    engine = open_engine(folder, threads=1)
    rng = np.random.default_rng(0)
    x = rng.random((16, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, 16)
    here = [engine.step(x, y) for _ in range(5)]
    assert rel_err(stock["losses"], here) <= 1e-5
