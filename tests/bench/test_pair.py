"""`bench pair`: two exports' training steps interleaved in one process.

Times are not bounded here; what is checked is that both engines really train (their weights move,
the same as stepping them apart), the figures' shape, JSON, a torch-free process, and refusals.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgecl.bench.pair import format_pair, measure_pair
from edgecl.runtime import OptimizerConfig, open_engine
from edgecl.runtime.errors import ArtifactError
from tests.bench.test_cli_flags import names, refused


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """mlp at 1x8x8 with and without masks (portable), cnn 1x8x8 (ort-training), mlp 1x6x6."""
    torch = pytest.importorskip("torch", reason="exporting needs torch (host side)")
    from edgecl.exporters import build_model, export

    root = tmp_path_factory.mktemp("pair")
    export(build_model("mlp", (1, 8, 8), 10, seed=1), torch.zeros(2, 1, 8, 8), root / "a")
    export(build_model("mlp", (1, 8, 8), 10, seed=1), torch.zeros(2, 1, 8, 8), root / "b", masks="weights")
    export(build_model("mlp", (1, 6, 6), 10, seed=1), torch.zeros(2, 1, 6, 6), root / "small")
    return root


def test_both_exports_train_and_the_figures_are_medians_of_pairs(exports):
    result = measure_pair(exports / "a", exports / "b", batch=8, threads=1, pairs=5, warmup=1)
    assert result.engines == ("portable", "portable") and result.pairs == 5
    assert all(m > 0 for m in result.median_ms) and result.ratio > 0 and result.ratio_iqr >= 0
    assert set(json.loads(json.dumps(result.to_dict()))) >= {"median_ms", "ratio", "load", "onnxruntime"}
    text = format_pair(result)
    assert "B / A per pair: median" in text and "a (portable)" in text


def test_the_steps_timed_are_real_training_steps(exports, monkeypatch):
    """Each engine took warmup + pairs steps of the same batch: its weights equal 6 steps taken alone."""
    from edgecl.runtime import engine as engine_module

    opened = []
    real_open = open_engine

    def keep(*args, **kwargs):
        opened.append(real_open(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr("edgecl.runtime.open_engine", keep)
    measure_pair(exports / "a", exports / "b", batch=8, threads=1, pairs=5, warmup=1, seed=3)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, 8)
    alone = real_open(exports / "a", OptimizerConfig("sgd", lr=0.01, momentum=0.9), threads=1)
    for _ in range(6):
        alone.step(x, y)
    assert len(opened) == 2 and isinstance(opened[0], engine_module.Engine)
    for k, v in alone.parameters().items():
        np.testing.assert_array_equal(opened[0].parameters()[k], v)
    assert any(not np.array_equal(opened[1].parameters()[k], v) for k, v in
               real_open(exports / "b", threads=1).parameters().items())  # B moved from its initial weights


def test_it_runs_without_torch(exports):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # importing torch now fails
        from edgecl.bench.pair import measure_pair
        r = measure_pair({str(exports / 'a')!r}, {str(exports / 'b')!r}, batch=4, threads=1, pairs=2, warmup=0)
        assert r.ratio > 0
        print("ok", "torch" in sys.modules and sys.modules["torch"] is not None)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["ok", "False"]


@pytest.mark.parametrize("flag, value", [("--pairs", "0"), ("--batch", "0"), ("--threads", "0"), ("--warmup", "-1")])
def test_bad_counts_are_refused_naming_the_flag(exports, tmp_path, flag, value):
    err = refused("bench", ["pair", str(exports / "a"), str(exports / "b"), flag, value], tmp_path)
    assert names(err, flag, value) and "accepted" in err


def test_exports_of_different_inputs_or_no_export_are_refused(exports, tmp_path):
    err = refused("bench", ["pair", str(exports / "a"), str(exports / "small")], tmp_path)
    assert "(1, 6, 6)" in err and "(1, 8, 8)" in err and "accepted: two exports of the same input" in err
    (tmp_path / "empty").mkdir()
    err = refused("bench", ["pair", str(exports / "a"), str(tmp_path / "empty")], tmp_path)
    assert "manifest" in err
    with pytest.raises(ArtifactError):
        measure_pair(exports / "a", Path(tmp_path / "missing"), pairs=1)
