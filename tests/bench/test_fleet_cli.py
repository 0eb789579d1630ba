"""`edgecl fleet simulate` end to end through the CLI, and its refusals of bad settings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgecl.bench.edgecl_cli import main

pytest.importorskip("ray")  # Flower's simulation engine


@pytest.mark.torch  # the host exports the model (in a child process)
def test_fleet_simulate_writes_the_result_json(tmp_path, capsys):
    out = tmp_path / "result.json"
    rc = main(["fleet", "simulate", "--clients", "2", "--rounds", "5", "--data", "digits", "--epochs", "2",
               "--sparsity", "0.75", "--encoding", "sparse", "--out", str(tmp_path / "out"), "--json", str(out),
               "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ACC" in printed and "forgetting" in printed and "bytes per round" in printed
    result = json.loads(out.read_text())
    for key in ("acc", "acc_matrix", "forgetting", "bytes_sent_per_round", "config"):
        assert key in result
    assert np.array(result["acc_matrix"]).shape == (5, 5)
    assert result["config"]["encoding"] == "sparse" and result["config"]["clients"] == 2
    assert len(result["bytes_sent_per_round"]) == 5 and min(result["bytes_sent_per_round"]) > 0


@pytest.mark.parametrize("argv, says", [
    (["--rounds", "7"], "--rounds, --tasks: rounds=7 with tasks=5"),
    (["--clients", "0"], "--clients: clients=0; accepted: an integer >= 1"),
    (["--encoding", "sparse"], "encoding='sparse'"),
    (["--fraction", "0"], "--fraction: fraction=0"),
    (["--alpha", "-1"], "--alpha: alpha=-1"),
])
def test_bad_settings_are_refused_before_anything_runs(tmp_path, capsys, argv, says):
    rc = main(["fleet", "simulate", "--out", str(tmp_path / "out"), *argv])
    assert rc == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
