"""`bench latency`: through the library and the CLI, on the MLP with few calls (structure, not speed)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from edgecl.bench import bench_cli
from edgecl.bench.fresh_process import MODEL_NAMES, ChildReport, check_shape, parse_shape
from edgecl.bench.latency import PHASES, LatencyConfig, LatencyRow, format_table, interleaved_ms, measure_latency, \
    to_csv

pytest.importorskip("torch", reason="exporting needs torch (host side)")
pytestmark = pytest.mark.torch  # exports in the test process


@pytest.fixture(scope="module")
def result(exports):
    """Train, infer and one cold start each for the portable engine and torch eager."""
    config = LatencyConfig("mlp", repeats=3, warmup=1, cold_starts=1, engines=("portable", "torch"))
    return measure_latency(config, exports)


def test_every_engine_and_phase_has_one_measured_row(result):
    keys = [(r.engine, r.phase) for r in result.rows]
    assert sorted(keys) == sorted((e, p) for e in ("portable", "torch") for p in PHASES)
    for r in result.rows:
        assert (r.source, r.target, r.model) == ("measured", "host", "mlp")
        assert r.median_ms > 0 and r.iqr_ms >= 0


def test_ratios_are_medians_over_torch_eager_of_the_same_phase(result):
    for phase in PHASES:
        torch_ms = result.row("torch", phase).median_ms
        assert result.row("torch", phase).ratio_to_torch == 1.0
        assert result.row("portable", phase).ratio_to_torch == pytest.approx(
            result.row("portable", phase).median_ms / torch_ms)


def test_cold_start_child_of_the_runtime_never_imports_torch(result):
    detail = {d.engine: d for d in result.cold_start}
    assert detail["portable"].process == "runtime-only" and detail["portable"].torch_imported is False
    assert detail["torch"].process == "torch-eager" and detail["torch"].torch_imported is True
    for d in detail.values():  # the stages happen in order, and the first step ends the cold start
        assert 0 < d.python_ms <= d.imports_ms <= d.open_ms <= d.first_step_ms
        assert d.first_step_ms == result.row(d.engine, "cold_start").median_ms


def test_json_shape_and_table(result):
    d = json.loads(json.dumps(result.to_dict()))
    assert d["kind"] == "latency" and d["model"] == "mlp" and d["batch"] == 32 and d["threads"] == 2
    assert set(d["rows"][0]) == {"model", "engine", "target", "source", "phase", "median_ms", "iqr_ms",
                                 "ratio_to_torch"}
    table = format_table(result)
    assert "cold_start" in table and "runtime-only" in table and "torch imported" in table
    csv_lines = to_csv(result).splitlines()
    assert csv_lines[0].startswith("model,engine,target,source,phase") and len(csv_lines) == 1 + len(result.rows)


@pytest.mark.ort_training
def test_cli_json_all_engines_without_cold_start(capsys, exports):
    argv = ["latency", "--model", "mlp", "--repeats", "3", "--warmup", "1", "--phases", "train,infer", "--json",
            "--cache", str(exports)]
    devices = importlib.util.find_spec("edgecl.devices.roofline") is not None
    if devices:
        argv += ["--device", "raspberry-pi-5"]
    assert bench_cli.main(argv) == 0
    d = json.loads(capsys.readouterr().out)
    measured = [r for r in d["rows"] if r["source"] == "measured"]
    assert {(r["engine"], r["phase"]) for r in measured} == {
        (e, p) for e in ("portable", "ort-training", "torch") for p in ("train", "infer")}
    assert d["cold_start_detail"] == []
    projected = [r for r in d["rows"] if r["source"] == "projected"]
    if devices:  # projections carry the device as target and never a ratio to a measurement
        assert {(r["phase"], r["target"]) for r in projected} == {("train", "raspberry-pi-5"),
                                                                  ("infer", "raspberry-pi-5")}
        assert all(r["ratio_to_torch"] is None and r["median_ms"] > 0 for r in projected)
    else:
        assert projected == []


def test_cli_csv_without_torch_has_no_ratio(capsys, exports):
    assert bench_cli.main(["latency", "--model", "mlp", "--engines", "portable", "--repeats", "1", "--phases",
                           "infer", "--csv", "--cache", str(exports)]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    assert row.startswith("mlp,portable,host,measured,infer,") and row.endswith(",")  # ratio_to_torch empty


@pytest.mark.parametrize("argv, message", [
    (["--engines", "portable,tflite"], "engines=['portable', 'tflite']"),
    (["--repeats", "0"], "repeats=0"),
    (["--cold-starts", "-1"], "cold_starts=-1"),
    (["--phases", "train,backward"], "phases=['train', 'backward']"),
    (["--input-shape", "1xax8"], "--input-shape '1xax8'"),
    (["--model", "cnn", "--input-shape", "64"], "input_shape=(64,) for 'cnn'"),
    (["--model", "vit"], "model 'vit' is unknown"),
    (["--device", "serial:"], "accepted: serial:PORT"),
])
def test_cli_refuses_bad_input_with_a_clear_message(capsys, argv, message):
    assert bench_cli.main(["latency", "--model", "mlp", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench latency: error:") and message in err


def test_config_and_row_checks():
    with pytest.raises(ValueError, match="batch=0"):
        LatencyConfig(batch=0)
    with pytest.raises(ValueError, match="target=''"):
        LatencyConfig(target="")
    with pytest.raises(ValueError, match="source='guessed'"):
        LatencyRow("mlp", "torch", "host", "guessed", "train", 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="median_ms=0"):
        LatencyRow("mlp", "torch", "host", "measured", "train", 0, 0.0, 1.0)
    with pytest.raises(ValueError, match="steps=2 with 1 losses"):
        ChildReport("torch", "torch-eager", 2, 1, 2, 3, 4, 5, None, None, 1, True, (0.5,))
    assert LatencyConfig(input_shape=[1, 28, 28]).input_shape == (1, 28, 28)
    assert parse_shape("1X28x28") == (1, 28, 28) and check_shape("mlp", (64,)) == (64,)
    with pytest.raises(ValueError, match="positive integers"):
        parse_shape("1x0x8")


def test_model_names_match_the_exporters():
    from edgecl.exporters.models import MODELS

    assert tuple(MODELS) == MODEL_NAMES


def test_interleaved_calls_take_turns_in_rotating_order():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    times = interleaved_ms(calls, warmup=1, repeats=3)
    assert {n: len(t) for n, t in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for ts in times.values() for t in ts)
    assert "".join(order) == "abc" "bca" "cab" "abc"  # one warm-up round, then three timed ones
