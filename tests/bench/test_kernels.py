"""`bench kernels`: ONNX Runtime's profile of an engine's training step, per op type, on small exports.

The figures are times, so nothing here bounds them; what is checked is what the profile must say
whatever the machine: shares that add up, op types of the graph, kernel counts that are whole and the
same every step, a JSON file that reads back to the same result and table, a runtime-only process
(torch unimportable) for the user's export, and bad flags refused before anything runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgecl.bench import bench_cli
from edgecl.bench.kernels import (KernelsConfig, KernelsResult, count_graph_nodes, format_table, measure_kernels,
                                  parse_profile)
from edgecl.runtime.errors import ArtifactError
from tests.bench.test_cli_flags import names, refused

STOCK_PYTHON = Path(__file__).resolve().parents[2] / ".venv-stock-ort" / "bin" / "python"
NO_STOCK = "no .venv-stock-ort: ./bootstrap.sh test creates it"
GRAPHS = {"portable": "step.onnx", "ort-training": "training_model.onnx"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """cnn at 1x8x8 exported for both ONNX engines (host side, torch)."""
    torch = pytest.importorskip("torch", reason="exporting needs torch (host side)")
    from edgecl.exporters import build_model, export

    root = tmp_path_factory.mktemp("kernels")
    for engine in GRAPHS:
        export(build_model("cnn", (1, 8, 8), 10, seed=1), torch.zeros(2, 1, 8, 8), root / engine, engine=engine)
    return root


def graph_op_types(path: Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(path).graph.node}


# --- the profile of a step ---------------------------------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize("engine", ["portable", pytest.param("ort-training", marks=pytest.mark.ort_training)])
def test_a_profile_has_whole_stable_counts_real_op_types_and_shares_adding_up(exports, engine):
    repeats = 4
    result = measure_kernels(KernelsConfig(artifacts=str(exports / engine), repeats=repeats, warmup=1))
    (e,) = result.engines
    assert e.engine == engine and e.graph_file == GRAPHS[engine] and e.torch_imported is False
    assert sum(o.share_pct for o in e.ops) == pytest.approx(100.0, abs=1e-9)
    assert [o.share_pct for o in e.ops] == sorted((o.share_pct for o in e.ops), reverse=True)
    # ORT's kernels are the file's ops, ORT's fused forms of them (FusedConv: a Conv and its Relu), or the
    # layout reorders its NCHWc transform puts around blocked convolutions
    in_file = graph_op_types(exports / engine / GRAPHS[engine])
    ops = {o.op_type for o in e.ops}
    known = in_file | {"Fused" + op for op in in_file} | ({"ReorderInput", "ReorderOutput"} if "Conv" in in_file else set())
    assert ops <= known, ops - known
    assert ops & {"Conv", "FusedConv"} and ops & {"Gemm", "FusedGemm", "MatMul", "FusedMatMul"}
    # the same kernels run every step: whole counts per op, one total per step, adding up
    assert len(e.kernels_per_step) == repeats and len(set(e.kernels_per_step)) == 1
    assert all(o.kernels_per_step >= 1 and float(o.kernels_per_step).is_integer() for o in e.ops)
    assert sum(o.kernels_per_step for o in e.ops) == e.kernels_per_step[0]
    assert e.file_nodes == count_graph_nodes(exports / engine / GRAPHS[engine])
    # kernels run inside ORT's run, which runs inside the call (1 us: ORT's profile rounds to whole us)
    assert 0 < e.kernel_ms_per_step <= e.run_ms_per_step + 1e-3 and e.run_ms_per_step <= e.wall_ms_per_step + 1e-3
    assert (result.model, result.input_shape, result.repeats) == (engine, (1, 8, 8), repeats)


@pytest.mark.torch
def test_node_count_equals_onnx_graph_node_and_a_non_model_is_refused(exports, tmp_path):
    import onnx

    for engine, graph in GRAPHS.items():
        path = exports / engine / graph
        assert count_graph_nodes(path) == len(onnx.load(path).graph.node) > 0
    bad = tmp_path / "step.onnx"
    bad.write_bytes(b"\xff\xff\xff")
    with pytest.raises(ArtifactError, match="step.onnx' is not an ONNX model"):
        count_graph_nodes(bad)


def _run(ts, dur):
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}


def _kernel(op, ts, dur):
    return {"cat": "Node", "name": f"n{ts}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}


def test_parse_profile_assigns_kernels_to_runs_and_leaves_out_warmup():
    events = [_run(0, 100), _kernel("Conv", 10, 50),  # warm-up
              _run(200, 100), _kernel("Conv", 210, 40), _kernel("Relu", 260, 5),
              {"cat": "Node", "name": "n270_fence_before", "ts": 270, "dur": 0, "args": {"op_name": "Add"}},
              _run(400, 100), _kernel("Conv", 405, 30), _kernel("Relu", 450, 7),
              _kernel("Add", 350, 9)]  # between runs: none of them
    assert parse_profile(events, warmup=1, repeats=2) == [{"Conv": [40.0], "Relu": [5.0]},
                                                          {"Conv": [30.0], "Relu": [7.0]}]
    with pytest.raises(RuntimeError, match="holds 3 runs, 4 were made"):
        parse_profile(events, warmup=1, repeats=3)


# --- the CLI: table, JSON, the user's export without torch, bad flags -------------------------------------------


@pytest.mark.torch
def test_json_reads_back_to_the_same_result_and_table(exports, tmp_path, capsys):
    out = tmp_path / "k" / "kernels.json"
    assert bench_cli.main(["kernels", "--artifacts", str(exports / "portable"), "--repeats", "2", "--warmup", "0",
                           "--top", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    result = KernelsResult.from_dict(data)
    assert data["kind"] == "kernels" and result.to_dict() == data
    assert printed == format_table(result, top=3) + f"\nwrote {out}\n"
    rows = [line for line in printed.splitlines() if line.startswith("| ") and not line.startswith("| op type |")]
    assert len(rows) == 4 and rows[-1].startswith(f"| other ({len(result.engines[0].ops) - 3} op types) |")
    assert "| other (" not in format_table(result, top=len(result.engines[0].ops))


@pytest.mark.torch
def test_a_built_in_model_is_exported_into_the_cache_and_profiled(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert bench_cli.main(["kernels", "--model", "mlp", "--input-shape", "16", "--engines", "portable",
                           "--cache", str(cache), "--repeats", "1", "--warmup", "0", "--json",
                           str(tmp_path / "k.json")]) == 0
    (e,) = KernelsResult.from_dict(json.loads((tmp_path / "k.json").read_text())).engines
    assert e.engine == "portable" and {o.op_type for o in e.ops} & {"Gemm", "FusedGemm", "MatMul", "FusedMatMul"}
    assert len(list(cache.glob("mlp-16-seed0-*/portable/step.onnx"))) == 1


CHILD = textwrap.dedent("""
    import json, sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    from edgecl.bench.bench_cli import main
    code = main(sys.argv[1:])
    print("TORCH " + json.dumps([m for m, v in sys.modules.items() if m.split(".")[0] == "torch" and v is not None]),
          file=sys.stderr)
    sys.exit(code)
""")


@pytest.mark.torch
@pytest.mark.parametrize("python", [
    sys.executable,
    pytest.param(str(STOCK_PYTHON), marks=pytest.mark.skipif(not STOCK_PYTHON.exists(), reason=NO_STOCK))],
    ids=["torch-unimportable", "stock-onnxruntime"])
def test_a_users_export_is_profiled_without_torch(exports, tmp_path, python):
    out = tmp_path / "kernels.json"
    run = subprocess.run([python, "-c", CHILD, "kernels", "--artifacts", str(exports / "portable"), "--repeats", "2",
                          "--warmup", "1", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "TORCH []" in run.stderr
    (e,) = KernelsResult.from_dict(json.loads(out.read_text())).engines
    assert e.torch_imported is False and e.ops and len(set(e.kernels_per_step)) == 1


@pytest.mark.parametrize("argv, flag, value, accepted", [
    (["--engines", "torch"], "--engines", "torch", "accepted: distinct names among portable, ort-training"),
    (["--engines", "portable,nope"], "--engines", "nope", "accepted: distinct names among portable, ort-training"),
    (["--repeats", "0"], "--repeats", "0", "accepted: an integer >= 1"),
    (["--warmup", "-1"], "--warmup", "-1", "accepted: an integer >= 0"),
    (["--top", "0"], "--top", "0", "accepted: an integer >= 1"),
    (["--batch", "0"], "--batch", "0", "accepted: an integer >= 1"),
    (["--artifacts", "a-folder"], "--artifacts", "a-folder", "no manifest.json in"),
    (["--artifacts", "a-folder", "--model", "cnn"], "--model", "--artifacts", "accepted: --artifacts alone"),
    (["--json", "a-folder"], "--json", "a-folder", "is a folder; accepted: a file path"),
    (["--cache", "a-file"], "--cache", "a-file", "is a file; accepted: a folder"),
    (["--cache", "a-file", "--json", "new/k.json"], "--cache", "a-file", "is a file; accepted: a folder"),
])
def test_a_bad_flag_is_refused_before_anything_runs(tmp_path, argv, flag, value, accepted):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    message = refused("bench", ["kernels", *argv], tmp_path)
    assert names(message, flag, value) and accepted in message, message


@pytest.mark.torch
def test_an_export_with_another_engine_is_refused_naming_both(exports, tmp_path):
    message = refused("bench", ["kernels", "--artifacts", str(exports / "portable"), "--engines", "ort-training"],
                      tmp_path)
    assert "--engines" in message and "--artifacts" in message and "accepted: engines ['portable']" in message
