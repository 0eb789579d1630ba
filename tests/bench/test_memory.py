"""`bench memory`: peak resident memory of fresh training processes, through the library and the CLI."""

from __future__ import annotations

import json

import pytest

from edgecl.bench import bench_cli
from edgecl.bench.memory import MemoryConfig, MemoryRow, format_table, measure_memory, to_csv

pytest.importorskip("torch", reason="exporting needs torch (host side)")
pytestmark = pytest.mark.torch  # exports in the test process


@pytest.fixture(scope="module")
def result(exports):
    return measure_memory(MemoryConfig("mlp", steps=3, engines=("portable", "torch")), exports)


def test_runtime_only_process_trains_without_torch_in_less_memory(result):
    runtime, torch_eager = result.row("portable"), result.row("torch")
    assert (runtime.process, runtime.torch_imported) == ("runtime-only", False)
    assert (torch_eager.process, torch_eager.torch_imported) == ("torch-eager", True)
    # torch's import alone is larger than the whole runtime process: if torch crept into the
    # runtime-only process, this would fail
    assert runtime.peak_rss_bytes < torch_eager.imports_rss_bytes


def test_peaks_and_ratios(result):
    base = result.row("torch").peak_rss_bytes
    for r in result.rows:
        assert (r.source, r.target, r.model) == ("measured", "host", "mlp")
        assert r.peak_rss_bytes >= r.imports_rss_bytes >= r.interpreter_rss_bytes > 0
        assert r.ratio_to_torch == pytest.approx(r.peak_rss_bytes / base)
    assert result.row("torch").ratio_to_torch == 1.0


def test_json_table_and_csv(result):
    d = json.loads(json.dumps(result.to_dict()))
    assert d["kind"] == "memory" and d["steps"] == 3 and d["engines"] == ["portable", "torch"]
    assert {"engine", "process", "peak_rss_bytes", "ratio_to_torch"} <= set(d["rows"][0])
    assert "runtime-only" in format_table(result) and "peak MiB" in format_table(result)
    assert len(to_csv(result).splitlines()) == 1 + len(result.rows)


@pytest.mark.ort_training
def test_cli_json_for_one_engine_has_no_ratio(capsys, exports):
    assert bench_cli.main(["memory", "--model", "mlp", "--engines", "ort-training", "--steps", "2", "--json",
                           "--cache", str(exports)]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["engine"] == "ort-training" and row["process"] == "runtime-only"
    assert row["peak_rss_bytes"] > 0 and row["ratio_to_torch"] is None


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "steps=0"),
    (["--repeats", "0"], "repeats=0"),
    (["--engines", "torch,torch"], "engines=['torch', 'torch']"),
    (["--engines", ""], "engines=[]"),
    (["--input-shape", "8x8"], "input_shape=(8, 8) for 'cnn'"),
])
def test_cli_refuses_bad_input(capsys, argv, message):
    assert bench_cli.main(["memory", "--model", "cnn", *argv]) == 2
    assert message in capsys.readouterr().err


def test_exports_are_reused_from_the_cache_folder(exports):
    from edgecl.bench.fresh_process import prepare
    from edgecl.bench.subject import resolve_subject

    subject = resolve_subject("mlp", (1, 8, 8))
    first = prepare(subject, 4, ("portable",), exports)
    stamp = (first.artifacts["portable"] / "manifest.json").stat().st_mtime_ns
    again = prepare(subject, 4, ("portable",), exports)
    assert again.artifacts == first.artifacts
    assert (again.artifacts["portable"] / "manifest.json").stat().st_mtime_ns == stamp  # not exported again


def test_row_checks():
    with pytest.raises(ValueError, match="peak_rss_bytes=0"):
        MemoryRow("mlp", "torch", "torch-eager", "host", "measured", 0, None, None, None, True)
    with pytest.raises(ValueError, match="source='projected'"):
        MemoryRow("mlp", "torch", "torch-eager", "host", "projected", 1, None, None, None, True)
