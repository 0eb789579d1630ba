"""`bench drift`: two engines from one seed, next to one ulp of float32 noise on one of them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgecl.bench import bench_cli
from edgecl.bench.cl_run import JobConfig, nudge_one_ulp
from edgecl.bench.drift import measure_drift
from edgecl.runtime.open import open_engine

pytest.importorskip("torch", reason="exporting needs torch (host side)")
pytestmark = pytest.mark.torch


def test_nudge_moves_exactly_one_entry_by_one_ulp(exported):
    _, art = exported("mlp")
    engine = open_engine(art)
    before = engine.parameters()
    name = nudge_one_ulp(engine)
    after = engine.parameters()
    assert name == next(iter(engine.param_shapes))
    changed = np.argwhere(before[name] != after[name])
    assert len(changed) == 1
    i = tuple(changed[0])
    assert after[name][i] == np.nextafter(before[name][i], np.float32(np.inf))
    assert all(np.array_equal(before[k], after[k]) for k in before if k != name)


def test_a_run_is_exactly_repeatable_so_the_ulp_gap_is_rounding_alone(tmp_path):
    from edgecl.bench.cl_run import run_job

    job = JobConfig(data="digits", model="mlp", method="derpp", sparsity=0.75, buffer=50, epochs=2, lr=0.1, threads=1)
    first, again = (run_job(job, tmp_path, progress=False)[0] for _ in range(2))
    assert first.acc_matrix == again.acc_matrix and first.train_flops == again.train_flops


def test_three_runs_per_seed_and_the_gaps_they_give(tmp_path):
    job = JobConfig(data="digits", model="mlp", method="er", sparsity=None, buffer=50, epochs=1, lr=0.1, threads=1)
    result = measure_drift(job, [0, 1], "torch", tmp_path, progress=False)
    assert [r.seed for r in result.rows] == [0, 1]
    for r in result.rows:
        assert 0 <= min(r.acc_a, r.acc_b, r.acc_a_ulp) and max(r.acc_a, r.acc_b, r.acc_a_ulp) <= 1
        assert r.engines_gap == abs(r.acc_a - r.acc_b) and r.ulp_gap == abs(r.acc_a - r.acc_a_ulp)
    d = result.to_dict()
    assert d["summary"]["engines_gap"]["max"] == pytest.approx(100 * max(r.engines_gap for r in result.rows))
    assert (d["engine_a"], d["engine_b"], d["label"]) == ("portable", "torch", "ER")


@pytest.mark.parametrize("seeds, engine_b, message", [
    ([], "torch", "seeds=\\[\\]; accepted: one or more"),
    ([0], "portable", "engine_b='portable' is the job's own engine"),
])
def test_bad_arguments_are_refused(seeds, engine_b, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        measure_drift(JobConfig(), seeds, engine_b, tmp_path, progress=False)


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "drift.json"
    argv = ["drift", "--model", "mlp", "--method", "er", "--dense", "--epochs", "1", "--buffer", "50", "--seeds", "3",
            "--out", str(tmp_path), "--json", str(out)]
    assert bench_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "|portable-torch|" in printed and "|1 ulp|" in printed
    assert json.loads(out.read_text())["rows"][0]["seed"] == 3


def test_a_nudged_job_says_so_in_its_label_and_config(tmp_path):
    from edgecl.bench.cl_run import run_job

    job = JobConfig(data="digits", model="mlp", method="er", sparsity=None, buffer=50, epochs=1, lr=0.1, threads=1,
                    nudge_ulp=True)
    result = run_job(job, tmp_path, progress=False)[0]
    assert result.config["label"] == "ER +1 ulp" and result.config["job"]["nudge_ulp"] is True
