"""edgecl.runtime.probe: a fresh runtime-only training process, and how its failures read."""

from __future__ import annotations

import numpy as np
import pytest

from edgecl.runtime.probe import probe_runtime, run_child


def test_a_fresh_process_trains_and_reports_its_memory_without_torch(exported, tmp_path):
    _, art = exported("mlp")
    batch = tmp_path / "batch.npz"
    rng = np.random.default_rng(0)
    np.savez(batch, x=rng.standard_normal((8, 1, 8, 8), dtype=np.float32), y=rng.integers(0, 10, 8))
    r = probe_runtime(art, batch, steps=3, threads=1)
    assert len(r["losses"]) == 3 and all(np.isfinite(r["losses"]))
    assert 0 < r["t_python"] < r["t_imports"] < r["t_open"] < r["t_first"] <= r["t_end"]
    assert 0 < r["rss_interpreter"] < r["rss_imports"] <= r["rss_peak"]
    assert r["torch_imported"] is False


def test_a_child_that_fails_or_hangs_is_a_runtime_error_naming_it():
    with pytest.raises(RuntimeError, match="(?s)failed with exit code 1: .*ZeroDivisionError"):
        run_child("1 / 0", {})
    with pytest.raises(RuntimeError, match="did not finish within 0.5 s"):
        run_child("import time; time.sleep(30)", {}, timeout_s=0.5)
    with pytest.raises(ValueError, match="steps=0, threads=1; accepted: both >= 1"):
        probe_runtime("art", "batch.npz", steps=0, threads=1)
