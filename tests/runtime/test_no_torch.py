"""The runtime imports and trains from artifacts alone, in a process where torch cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    import numpy as np
    import edgecl.runtime as rt
    from edgecl.runtime import OptimizerConfig, open_engine
    engine = open_engine(sys.argv[1], OptimizerConfig("sgd", lr=0.1), threads=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, 16)
    losses = [engine.step(x, y) for _ in range(5)]
    loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    print(json.dumps({"losses": losses, "torch_modules": [m for m in loaded if sys.modules[m] is not None],
                      "logits": engine.evaluate(x).shape}))
""")


@pytest.mark.parametrize("engine", ["portable", pytest.param("ort-training", marks=pytest.mark.ort_training)])
def test_runtime_trains_with_torch_unimportable(exported, engine):
    _, folder = exported("cnn", engine)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(folder)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["torch_modules"] == []
    assert result["logits"] == [16, 10]
    assert result["losses"][-1] < result["losses"][0]  # it learns
