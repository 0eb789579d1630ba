"""`bench run` (a resumable matrix of runs) and `bench summary` on Split Digits."""

from __future__ import annotations

import json

import pytest

from edgecl.bench import bench_cli
from edgecl.bench.matrix import markdown_table, run_matrix, summarize


def test_matrix_runs_resumes_and_summarizes(tmp_path, capsys):
    out = tmp_path / "m"
    paths = run_matrix(["finetune", "derpp"], [0, 1], out, data="digits", epochs=1, buffer=50, workers=2,
                       progress=False)
    assert all(p.exists() for p in paths) and len(paths) == 4
    stamp = {p: p.stat().st_mtime_ns for p in paths}
    run_matrix(["finetune", "derpp"], [0, 1], out, data="digits", epochs=1, buffer=50, workers=2, progress=False)
    assert {p: p.stat().st_mtime_ns for p in paths} == stamp  # done cells are skipped
    with pytest.raises(ValueError, match="holds runs of .*'epochs': 1.*asked for .*'epochs': 2"):
        run_matrix(["er"], [0], out, data="digits", epochs=2, buffer=50, progress=False)  # no mixed tables
    rows = summarize(out)
    assert [r["strategy"] for r in rows] == ["finetune", "derpp"]
    derpp = rows[1]
    assert derpp["seeds"] == 2 and derpp["flops_vs_reference"] == pytest.approx(1.0)
    assert 0 <= derpp["acc"][0] <= 100 and derpp["acc"][1] >= 0
    assert "| DER++ | 2 |" in markdown_table(rows)
    assert bench_cli.main(["summary", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["strategy"] == "finetune"


def test_matrix_refuses_unknown_strategy(tmp_path, capsys):
    with pytest.raises(ValueError, match="'ewc'"):
        run_matrix(["ewc"], [0], tmp_path)
    assert bench_cli.main(["run", "--strategies", "ewc", "--out", str(tmp_path)]) == 2
    assert "ewc" in capsys.readouterr().err


def test_bench_run_cli_writes_the_cells_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["run", "--strategies", "finetune", "--seeds", "0", "--data", "digits", "--epochs", "1", "--buffer", "50",
            "--workers", "1", "--out", str(out)]
    assert bench_cli.main(argv) == 0
    assert "| Fine-tune | 1 |" in capsys.readouterr().out
    result = json.loads((out / "runs" / "finetune-seed0.json").read_text())
    assert len(result["acc_matrix"]) == 5 and result["config"]["job"]["method"] == "finetune"


def test_a_single_seed_row_says_so_instead_of_a_zero_spread():
    row = {"label": "DER++", "seeds": 1, "acc": (80.0, 0.0), "task_il_acc": (97.0, 0.0), "forgetting": (20.0, 0.0),
           "flops_vs_reference": 1.0, "fewer_flops_than_reference": 1.0, "peak_rss_mib": (600.0, 0.0),
           "wall_s": (700.0, 0.0)}
    line = markdown_table([row]).splitlines()[-1]
    assert "80.00 (one seed)" in line and "±" not in line
    assert "80.00 ± 1.50" in markdown_table([{**row, "seeds": 2, "acc": (80.0, 1.5)}])


def test_summary_of_an_empty_or_corrupt_folder_names_the_problem(tmp_path, capsys):
    assert bench_cli.main(["summary", str(tmp_path / "nothing")]) == 2
    assert "no run JSON under" in capsys.readouterr().err
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "derpp-seed1.json").write_text('{"acc_matrix": [[0.9')  # cut off mid-write
    assert bench_cli.main(["summary", str(tmp_path)]) == 2
    assert "derpp-seed1.json is not a readable run JSON" in capsys.readouterr().err
    with pytest.raises(ValueError, match="derpp-seed1.json is not a readable run JSON"):
        run_matrix(["derpp"], [1], tmp_path, data="digits", epochs=1, buffer=50, progress=False)  # not "done"
    (tmp_path / "runs" / "derpp-seed1.json").write_text('{"acc": 0.5}')
    with pytest.raises(ValueError, match="derpp-seed1.json is not a run JSON: no acc_matrix, task_il_acc"):
        summarize(tmp_path)
    assert bench_cli.main(["report", "--runs", str(tmp_path), "--out", str(tmp_path / "report")]) == 2
    assert "derpp-seed1.json is not a run JSON" in capsys.readouterr().err


def test_wall_time_is_compared_with_the_reference_run_of_the_same_seed(tmp_path):
    (tmp_path / "runs").mkdir()

    def write(strategy, seed, wall, flops):
        run = {k: 0.0 for k in ("acc", "task_il_acc", "forgetting", "bwt", "dense_train_flops", "peak_rss_bytes")}
        run.update(acc_matrix=[[1.0]], train_flops=flops, wall_s=wall,
                   config={"label": strategy, "job": {"seed": seed, "engine": "portable"}})
        (tmp_path / "runs" / f"{strategy}-seed{seed}.json").write_text(json.dumps(run))

    for seed, (dense, channel) in enumerate([(100.0, 40.0), (200.0, 100.0), (150.0, 90.0)]):
        write("derpp", seed, dense, 4.0)
        write("sparcl-derpp-ch-0.50", seed, channel, 1.0)
    rows = {r["strategy"]: r for r in summarize(tmp_path)}
    assert rows["sparcl-derpp-ch-0.50"]["wall_vs_reference"] == pytest.approx(0.5)  # median of 0.4, 0.5, 0.6
    assert rows["derpp"]["wall_vs_reference"] == 1.0
    assert "0.50x (2.00x faster)" in markdown_table(list(rows.values()))


def test_a_narrower_network_is_labelled_with_its_width(tmp_path):
    (tmp_path / "runs").mkdir()
    run = {k: 0.0 for k in ("acc", "task_il_acc", "forgetting", "bwt", "dense_train_flops", "peak_rss_bytes")}
    run.update(acc_matrix=[[1.0]], train_flops=1.0, wall_s=1.0,
               config={"label": "DER++", "job": {"seed": 0, "engine": "portable", "width": 7}})
    (tmp_path / "runs" / "derpp-w7-seed0.json").write_text(json.dumps(run))
    assert summarize(tmp_path)[0]["label"] == "DER++ (width 7)"
