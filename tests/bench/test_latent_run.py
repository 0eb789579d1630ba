"""`edgecl run --latent-split`: refusals before any file, and a run that freezes after task 1."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgecl.bench.cl_run import JobConfig

RUN = [sys.executable, "-m", "edgecl.bench.edgecl_cli", "run", "--epochs", "2", "--threads", "1", "--quiet", "--dense"]


@pytest.mark.parametrize("flags, message", [
    (["--latent-split", "9"], "split='9' is no split point of this Sequential; accepted: '0', '1'"),
    (["--latent-split", "2", "--freeze-after", "0"], "freeze_after=0; accepted: an integer >= 1"),
])
def test_bad_latent_flags_are_refused_before_any_file(tmp_path, flags, message):
    proc = subprocess.run(RUN + ["--out", str(tmp_path / "out")] + flags, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_latent_replay_needs_a_dense_strategy_on_the_portable_engine():
    with pytest.raises(ValueError, match="accepted: latent replay with engine='portable' and a dense strategy"):
        JobConfig(latent_split="2", sparsity=0.75)
    with pytest.raises(ValueError, match="accepted: latent replay with engine='portable'"):
        JobConfig(latent_split="2", sparsity=None, engine="torch")


def test_a_latent_run_trains_fewer_flops_than_the_full_run(tmp_path):
    results = {}
    for name, flags in (("full", []), ("latent", ["--latent-split", "5"])):
        path = tmp_path / f"{name}.json"
        proc = subprocess.run(RUN + ["--out", str(tmp_path / "out"), "--json", str(path)] + flags, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads(path.read_text())
    full, latent = results["full"], results["latent"]
    assert latent["config"]["label"] == "DER++, latent replay at 5 after task 1"
    assert latent["acc_matrix"][0] == full["acc_matrix"][0]  # task 1 trains the whole model either way
    assert latent["train_flops"] < full["train_flops"]
    assert latent["budget_plan"]["buffer_bytes"] > full["budget_plan"]["buffer_bytes"]  # 500 latents > 500 inputs
