"""`bench report` and the FLOPs table of a `bench run` folder, from small result files the tests write."""

from __future__ import annotations

import json

import pytest

from edgecl.bench import bench_cli
from edgecl.bench.cl_flops import cl_flops_table, markdown_table
from edgecl.bench.report import read_rows, write_report
from edgecl.runtime.flops import dense_training_flops, training_flops

LAYERS = [
    {"weight": "0.weight", "bias": "0.bias", "weight_shape": [4, 1, 3, 3], "macs_per_sample": 900,
     "in_elements": 100, "out_elements": 400, "needs_input_grad": False},
    {"weight": "2.weight", "bias": "2.bias", "weight_shape": [8, 4, 3, 3], "macs_per_sample": 7200,
     "in_elements": 400, "out_elements": 200, "needs_input_grad": True},
    {"weight": "4.weight", "bias": "4.bias", "weight_shape": [10, 200], "macs_per_sample": 2000,
     "in_elements": 200, "out_elements": 10, "needs_input_grad": True},
]
SPARSE = {"2.weight"}  # first and last stay dense


def run_json(acc: float, samples: int, sparsity: float | None, label: str) -> dict:
    sparcl = None if sparsity is None else {"sparsity": sparsity, "tdm": True, "dgm": True, "ddr": True,
                                            "grad_density": 0.2, "dense_first_last": True}
    wd = {} if sparsity is None else {n: 1 - sparsity for n in SPARSE}
    gd = {} if sparsity is None else {n: 0.2 for n in SPARSE}
    R = [[acc if j <= i else 0.0 for j in range(3)] for i in range(3)]
    return {"acc_matrix": R, "task_il_matrix": R, "acc": acc, "task_il_acc": acc, "bwt": -0.1, "forgetting": 0.1,
            "fwt": 0.0, "train_flops": training_flops(LAYERS, samples, wd, gd).total,
            "dense_train_flops": dense_training_flops(LAYERS, samples).total, "steps": samples // 32,
            "peak_rss_bytes": 300 * 2**20, "wall_s": 10.0,
            "config": {"strategy": {"method": "derpp", "sparcl": sparcl}, "job": {"engine": "portable"},
                       "label": label}}


@pytest.fixture
def runs_dir(tmp_path):
    out = tmp_path / "bench-run"
    (out / "runs").mkdir(parents=True)
    (out / "artifacts" / "cnn-portable-x").mkdir(parents=True)
    (out / "artifacts" / "cnn-portable-x" / "manifest.json").write_text(json.dumps({"extra": {"layers": LAYERS}}))
    for seed, (a, b) in enumerate([(0.80, 0.78), (0.82, 0.76)]):
        (out / "runs" / f"derpp-seed{seed}.json").write_text(json.dumps(run_json(a, 9600, None, "DER++")))
        (out / "runs" / f"sparcl-derpp-0.75-seed{seed}.json").write_text(
            json.dumps(run_json(b, 8000, 0.75, "SparCL-DER++ 0.75")))
    return out


def latency_file(path, rows):
    path.write_text(json.dumps({"kind": "latency", "rows": rows}))
    return path


LATENCY = [
    {"model": "cnn", "engine": "torch", "target": "host", "source": "measured", "median_ms": 5.0, "iqr_ms": 0.4,
     "ratio_to_torch": 1.0},
    {"model": "cnn", "engine": "portable", "target": "host", "source": "measured", "median_ms": 4.0, "iqr_ms": 0.2,
     "ratio_to_torch": 0.8},
    {"model": "cnn", "engine": "roofline", "target": "raspberry-pi-4", "source": "projected", "median_ms": 3.5,
     "iqr_ms": None, "ratio_to_torch": None},
    # as `bench latency --json` writes them: a phase, extra keys
    {"model": "cnn", "engine": "portable", "target": "host", "source": "measured", "phase": "infer",
     "median_ms": 1.25, "iqr_ms": 0.05, "ratio_to_torch": 0.5, "extra": "ignored"},
]
MEMORY = {"kind": "memory", "rows": [
    {"engine": "torch", "process": "torch eager", "peak_rss_bytes": 400 * 2**20, "ratio_to_torch": 1.0},
    {"engine": "portable", "process": "runtime only", "peak_rss_bytes": 100 * 2**20, "ratio_to_torch": 0.25}]}


def test_flops_table_rebuilds_the_split_and_ratio(runs_dir):
    rows = {r.strategy: r for r in cl_flops_table(runs_dir)}
    dense, sparse = rows["derpp"], rows["sparcl-derpp-0.75"]
    assert dense.ratio_to_reference == 1.0 and dense.seeds == 2 and sparse.sparsity == 0.75
    for r in (dense, sparse):
        assert r.check == pytest.approx(0.0, abs=1e-12)
        assert r.forward + r.input_grad + r.weight_grad == pytest.approx(r.train_flops)
    expected = training_flops(LAYERS, 8000, {"2.weight": 0.25}, {"2.weight": 0.2})
    assert sparse.weight_grad == pytest.approx(expected.weight_grad)
    assert sparse.ratio_to_reference == pytest.approx(expected.total / dense_training_flops(LAYERS, 9600).total)
    table = markdown_table(cl_flops_table(runs_dir))
    assert "| DER++ | 2 |" in table and "x fewer)" in table


def test_flops_table_leaves_out_a_split_that_does_not_add_up(runs_dir):
    path = runs_dir / "runs" / "sparcl-derpp-0.75-seed0.json"
    run = json.loads(path.read_text())
    run["train_flops"] *= 1.05  # a count the configuration cannot explain
    path.write_text(json.dumps(run))
    row = {r.strategy: r for r in cl_flops_table(runs_dir)}["sparcl-derpp-0.75"]
    assert row.forward is None and row.train_flops > 0
    assert "n/a" in markdown_table([row])


def test_write_report_library(runs_dir, tmp_path):
    lat = latency_file(tmp_path / "lat.json", LATENCY)
    mem = tmp_path / "mem.json"
    mem.write_text(json.dumps(MEMORY))
    result = write_report(tmp_path / "report", runs=runs_dir, latency=[lat], memory=[mem])
    assert result.sections == ("continual-learning", "latency", "memory")
    names = sorted(p.name for p in result.plots)
    assert names == ["acc_matrices.png", "acc_vs_flops.png", "latency_measured.png", "latency_projected.png",
                     "memory.png"]
    for p in result.plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000
    md = result.markdown.read_text()
    for p in result.plots:
        assert f"]({p.name})" in md
    # measured and projected rows are in separate tables, the projected one labelled
    measured, projected = md.split("### Measured on this machine")[1].split("### PROJECTED")
    assert "raspberry-pi-4" not in measured and "| cnn | train | portable | host | 4.000 | 0.200 | 0.80x |" in measured
    assert "| cnn | infer | portable | host | 1.250 | 0.050 | 0.50x |" in measured
    assert "raspberry-pi-4" in projected.split("## Peak memory")[0]
    assert "|  | portable | runtime only | 100.0 | 0.25x |" in md
    assert "SparCL-DER++ 0.75" in md and "training TFLOPs" in md


def test_report_cli(runs_dir, tmp_path, capsys):
    lat = latency_file(tmp_path / "lat.json", LATENCY[:2])
    assert bench_cli.main(["report", "--runs", str(runs_dir), "--latency", str(lat), "--out", str(tmp_path / "r"),
                           "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sections"] == ["continual-learning", "latency"] and len(out["plots"]) == 3
    assert "PROJECTED" not in (tmp_path / "r" / "report.md").read_text().split("## Latency")[1]


@pytest.mark.parametrize("content, message", [
    ({"kind": "memory", "rows": []}, 'accepted: {"kind": "latency"'),
    ({"kind": "latency", "rows": [{"model": "cnn", "engine": "torch", "target": "host", "source": "measured"}]},
     r"rows[0] lacks ['median_ms']"),
    ({"kind": "latency", "rows": [{**LATENCY[0], "source": "guessed"}]}, "source='guessed'; accepted: measured, projected"),
])
def test_bad_latency_files(tmp_path, capsys, content, message):
    path = tmp_path / "lat.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError) as info:
        read_rows(path, "latency")
    assert message in str(info.value)
    assert bench_cli.main(["report", "--runs", str(tmp_path), "--latency", str(path), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_report_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="nothing to report"):
        write_report(tmp_path / "o")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        read_rows(tmp_path / "bad.json", "memory")
    assert bench_cli.main(["report", "--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no run JSON" in capsys.readouterr().err
    assert bench_cli.main(["report", "--latency", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_cli_latency_only_and_memory_only(tmp_path, capsys):
    lat = latency_file(tmp_path / "lat.json", LATENCY[2:3])
    assert bench_cli.main(["report", "--latency", str(lat), "--out", str(tmp_path / "r"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sections"] == ["latency"] and [p.rsplit("/", 1)[1] for p in out["plots"]] == ["latency_projected.png"]
    mem = tmp_path / "mem.json"
    mem.write_text(json.dumps(MEMORY))
    assert bench_cli.main(["report", "--memory", str(mem), "--out", str(tmp_path / "m")]) == 0
    assert "memory.png" in capsys.readouterr().out


def test_flops_table_recognises_the_earlier_weight_gradient_counting(runs_dir):
    """At sparsity 0.9 (density 0.1 < DGM's 0.2) a count priced over masked weights is recognised."""
    path = runs_dir / "runs" / "sparcl-derpp-0.75-seed0.json"
    run = json.loads(path.read_text())
    run["config"]["strategy"]["sparcl"]["sparsity"] = 0.9
    run["train_flops"] = training_flops(LAYERS, 8000, {"2.weight": 0.1}, {"2.weight": 0.2}).total
    (runs_dir / "runs" / "sparcl-derpp-0.90-seed0.json").write_text(json.dumps(run))
    row = {r.strategy: r for r in cl_flops_table(runs_dir)}["sparcl-derpp-0.90"]
    assert row.legacy_counting and row.check == pytest.approx(0.0, abs=1e-12)
    assert row.current_total == pytest.approx(training_flops(LAYERS, 8000, {"2.weight": 0.1}, {"2.weight": 0.1}).total)
    assert row.current_total < row.train_flops
    table = markdown_table(cl_flops_table(runs_dir))
    assert "| SparCL-DER++ 0.75 (1) |" in table and "(1) recorded with weight-gradient work" in table


def test_rows_carry_the_input_shape_of_their_file(tmp_path):
    """Two files of the same model at different input sizes stay apart in the report."""
    small, large = tmp_path / "s.json", tmp_path / "l.json"
    small.write_text(json.dumps({"kind": "latency", "rows": LATENCY[:2], "input_shape": [1, 8, 8]}))
    large.write_text(json.dumps({"kind": "latency", "rows": LATENCY[:2], "input_shape": [1, 28, 28]}))
    assert {r["model"] for r in read_rows(small, "latency")} == {"cnn 1x8x8"}
    assert {r["model"] for r in read_rows(large, "latency")} == {"cnn 1x28x28"}
    assert {r["model"] for r in read_rows(latency_file(tmp_path / "n.json", LATENCY[:2]), "latency")} == {"cnn"}


def test_flops_split_of_a_run_with_measured_weight_gradient_density(runs_dir):
    """A run whose DGM-kept active entries were fewer than nominal: the remainder is weight-gradient work."""
    path = runs_dir / "runs" / "sparcl-derpp-0.75-seed0.json"
    run = json.loads(path.read_text())
    run["train_flops"] = training_flops(LAYERS, 8000, {"2.weight": 0.25}, {"2.weight": 0.15}).total
    path.write_text(json.dumps(run))
    nominal = training_flops(LAYERS, 8000, {"2.weight": 0.25}, {"2.weight": 0.2})
    table = {r.strategy: r for r in cl_flops_table(runs_dir)}
    row = table["sparcl-derpp-0.75"]  # mean of this seed (measured) and seed 1 (nominal)
    assert row.forward == pytest.approx(nominal.forward) and row.input_grad == pytest.approx(nominal.input_grad)
    measured = training_flops(LAYERS, 8000, {"2.weight": 0.25}, {"2.weight": 0.15}).weight_grad
    assert row.weight_grad == pytest.approx((measured + nominal.weight_grad) / 2)
    assert row.forward + row.input_grad + row.weight_grad == pytest.approx(row.train_flops)
    run["train_flops"] = 2 * nominal.total  # more than any reading allows: no split
    path.write_text(json.dumps(run))
    assert {r.strategy: r for r in cl_flops_table(runs_dir)}["sparcl-derpp-0.75"].forward is None
