"""`bench latency | memory | flops` on the user's own model: an export of theirs (`--artifacts DIR`, read
only, its own engine, no torch needed) or `--model FILE.py:FUNCTION` (exported by bench into `--cache`),
through the library and the CLIs; contradictory flags refused naming both, before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

from edgecl.bench import bench_cli
from edgecl.bench.latency import LatencyConfig, measure_latency
from edgecl.bench.memory import MemoryConfig, measure_memory
from tests.bench.test_cli_flags import refused

pytest.importorskip("torch", reason="exporting needs torch (host side)")
pytestmark = pytest.mark.torch  # the user's export is made in the test process

STOCK_PYTHON = Path(__file__).resolve().parents[2] / ".venv-stock-ort" / "bin" / "python"
MODEL_PY = '''
import torch
from torch import nn

from blocks import head  # a sibling module: the file's folder is on sys.path, as for `python net.py`


def build():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), head(4 * 8 * 8, 5))


def needs_args(width):
    return build()


def not_a_module():
    return "net"
'''
BLOCKS_PY = '''
from torch import nn


def head(features, classes):
    return nn.Linear(features, classes)
'''


def snapshot(folder: Path) -> dict:
    """Every entry under `folder` with its bytes' sha256 and mtime: what 'nothing written' compares."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                         p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A folder holding what a user brings: two exports of theirs and a model file."""
    import torch

    from edgecl.exporters import build_model, export

    root = tmp_path_factory.mktemp("user")
    for engine in ("portable", "ort-training"):
        export(build_model("cnn", (1, 8, 8), 10, seed=3), torch.zeros(2, 1, 8, 8), root / f"my-{engine}", engine=engine)
    (root / "net.py").write_text(MODEL_PY)
    (root / "blocks.py").write_text(BLOCKS_PY)
    return root


# --- --artifacts: the user's export, benched as it is --------------------------------------------------------------


def test_latency_on_a_users_export_runs_its_engine_and_writes_nothing_there(user):
    """Before issue 12, --artifacts was the cache: bench exported the default cnn into the user's folder."""
    before = snapshot(user)
    result = measure_latency(LatencyConfig(artifacts=str(user / "my-portable"), repeats=3, warmup=1, cold_starts=1))
    assert {(r.engine, r.phase) for r in result.rows} == {("portable", p) for p in ("train", "infer", "cold_start")}
    assert all(r.model == "my-portable" and r.ratio_to_torch is None for r in result.rows)
    [cold] = result.cold_start
    assert (cold.process, cold.torch_imported) == ("runtime-only", False)
    c = result.config
    assert (c.model, c.input_shape, c.num_classes, c.engines) == (None, (1, 8, 8), 10, ("portable",))
    assert snapshot(user) == before


def test_cli_latency_and_memory_on_a_users_export(user, capsys):
    before = snapshot(user)
    art = str(user / "my-portable")
    assert bench_cli.main(["latency", "--artifacts", art, "--repeats", "2", "--warmup", "0", "--phases", "train",
                           "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["engine"], r["phase"]) for r in out["rows"]] == [("my-portable", "portable", "train")]
    assert out["artifacts"] == art and out["model"] is None
    assert bench_cli.main(["memory", "--artifacts", art, "--steps", "2", "--csv"]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    assert row.startswith("my-portable,portable,runtime-only,host,measured,") and ",False" in row
    assert snapshot(user) == before


@pytest.mark.ort_training
def test_an_ort_training_export_is_benched_on_its_own_engine(user):
    before = snapshot(user)
    result = measure_memory(MemoryConfig(artifacts=str(user / "my-ort-training"), steps=2))
    [row] = result.rows
    assert (row.engine, row.process, row.torch_imported, row.ratio_to_torch) == (
        "ort-training", "runtime-only", False, None)
    assert snapshot(user) == before


def test_library_refuses_contradictions_naming_both_fields(user, tmp_path):
    art = str(user / "my-portable")
    cases = [
        (dict(model="cnn", artifacts=art), "model='cnn' with artifacts="),
        (dict(artifacts=art, input_shape=(3, 8, 8)), "input_shape=(3, 8, 8) with artifacts="),
        (dict(artifacts=art, num_classes=5), "num_classes=5 with artifacts="),
        (dict(artifacts=art, engines=("portable", "torch")), "engines=['portable', 'torch'] with artifacts="),
        (dict(artifacts=art, engines=("ort-training",)), "accepted: engines ['portable'] or none"),
    ]
    for config in (LatencyConfig, MemoryConfig):
        for fields, message in cases:
            with pytest.raises(ValueError, match=re.escape(message)):
                config(**fields)
    # the manifest's own values are no contradiction (a config's to_dict() builds it again)
    config = LatencyConfig(artifacts=art, input_shape=(1, 8, 8), num_classes=10, engines=("portable",))
    assert LatencyConfig(**{k: v for k, v in config.to_dict().items()}).artifacts == art
    with pytest.raises(ValueError, match="cache_dir=.* with artifacts=.*accepted: one of the two"):
        measure_latency(LatencyConfig(artifacts=art), tmp_path / "cache")
    with pytest.raises(ValueError, match=r"cache_dir=.* holds an export \(manifest.json\)"):
        measure_memory(MemoryConfig("mlp"), art)
    assert not (tmp_path / "cache").exists()


def test_cli_refuses_contradictions_naming_both_flags_and_writes_nothing(user):
    art = str(user / "my-portable")
    cases = [  # argv, the flags named, what the message says
        (["latency", "--artifacts", art, "--model", "cnn"], ["--model", "--artifacts"], "accepted: --artifacts alone"),
        (["memory", "--artifacts", art, "--cache", "kept"], ["--cache", "--artifacts"], "nothing is exported"),
        (["latency", "--artifacts", art, "--input-shape", "1x8x8"], ["--input-shape", "--artifacts"], "manifest gives"),
        (["flops", "--artifacts", art, "--classes", "10"], ["--classes", "--artifacts"], "manifest gives"),
        (["latency", "--artifacts", art, "--engines", "portable,torch"], ["--engines", "--artifacts"],
         "accepted: engines ['portable'] or none"),
        (["memory", "--cache", art], ["--cache"], "holds an export (manifest.json)"),  # the default cnn: never there
        (["latency", "--model", "cnn", "--cache", art], ["--cache"], "never into a user's export"),
        (["latency", "--cache", f"{art}/kept"], ["--cache"], "is inside the export"),
        (["latency", "--artifacts", str(user)], ["--artifacts"], "no manifest.json"),
    ]
    for argv, flags, message in cases:
        err = refused("bench", argv, user)  # nothing written in the user's folder, nor under it
        assert message in err and all(flag in err for flag in flags), (argv, err)


# --- --model FILE.py:FUNCTION: the user's model, exported by bench into its cache -----------------------------------


def test_latency_of_a_model_file_against_torch_eager_exports_into_the_cache(user, tmp_path):
    spec = f"{user / 'net.py'}:build"
    config = LatencyConfig(spec, (1, 8, 8), repeats=3, warmup=1, cold_starts=1, engines=("portable", "torch"),
                           num_classes=5)
    before = snapshot(user)
    result = measure_latency(config, tmp_path / "cache")
    assert {(r.engine, r.phase) for r in result.rows} == {(e, p) for e in ("portable", "torch")
                                                          for p in ("train", "infer", "cold_start")}
    assert all(r.model == spec and r.ratio_to_torch > 0 for r in result.rows)
    detail = {d.engine: d for d in result.cold_start}
    assert detail["torch"].process == "torch-eager" and detail["portable"].torch_imported is False
    [kept] = (tmp_path / "cache").glob("net.build-1x8x8-seed0-*")
    assert (kept / "portable" / "manifest.json").is_file()
    assert snapshot(user) == before  # the model file is read, nothing written beside it (no __pycache__)


def test_the_cache_reuses_an_export_and_never_a_stale_one(user, tmp_path):
    from edgecl.bench.fresh_process import prepare
    from edgecl.bench.subject import resolve_subject

    file = tmp_path / "net.py"
    file.write_text(MODEL_PY)
    (tmp_path / "blocks.py").write_text(BLOCKS_PY)
    subject = resolve_subject(f"{file}:build", (1, 8, 8), 5)
    first = prepare(subject, 4, ("portable",), tmp_path / "cache")
    stamp = (first.artifacts["portable"] / "manifest.json").stat().st_mtime_ns
    again = prepare(subject, 4, ("portable",), tmp_path / "cache")
    assert again.artifacts == first.artifacts  # same file, same model: reused
    assert (again.artifacts["portable"] / "manifest.json").stat().st_mtime_ns == stamp
    file.write_text(MODEL_PY.replace("nn.Conv2d(1, 4, 3, padding=1)", "nn.Conv2d(1, 4, 5, padding=2)"))
    edited = prepare(subject, 4, ("portable",), tmp_path / "cache")
    assert edited.artifacts["portable"] != first.artifacts["portable"]  # the edited model is exported anew
    assert edited.torch_model[0].kernel_size == (5, 5)
    with __import__("numpy").load(edited.batch_file) as z:
        assert z["y"].max() < 5  # labels of the model's 5 classes


def test_cli_memory_and_flops_of_a_model_file(user, tmp_path, capsys):
    from edgecl.bench.flops_report import flops_report

    spec = f"{user / 'net.py'}:build"
    assert bench_cli.main(["memory", "--model", spec, "--input-shape", "1x8x8", "--classes", "5", "--engines",
                           "torch,portable", "--steps", "2", "--cache", str(tmp_path / "cache"), "--json"]) == 0
    rows = {r["engine"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["torch"]["process"] == "torch-eager" and rows["torch"]["torch_imported"] is True
    assert rows["portable"]["torch_imported"] is False and rows["portable"]["ratio_to_torch"] > 0
    assert bench_cli.main(["flops", "--model", spec, "--input-shape", "1x8x8", "--classes", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    lib = flops_report(spec, (1, 8, 8), num_classes=5)
    assert out["flops"] == json.loads(json.dumps(lib.flops.to_dict())) and out["model"] == spec
    assert [layer.weight for layer in lib.flops.step.layers] == ["0.weight", "3.weight"]
    assert lib.flops.step.forward == 2 * 32 * (4 * 64 * 9 + 256 * 5)  # batch 32: conv + linear MACs, 2 FLOPs each


def test_cli_refuses_a_bad_model_file_naming_the_flag(user):
    net = str(user / "net.py")
    cases = [  # argv, the flags named, what the message says
        (["latency", "--model", f"{net}:build"], ["--model", "--input-shape"], "a model file's input is not known"),
        (["latency", "--model", f"{user / 'none.py'}:build", "--input-shape", "1x8x8"], ["--model"], "is not a file"),
        (["memory", "--model", f"{user / 'net.txt'}:build"], ["--model"], "accepted: a built-in family"),
        (["latency", "--model", f"{net}:nope", "--input-shape", "1x8x8"], ["--model"],
         "has no function 'nope'; accepted: one of build, needs_args, not_a_module"),
        (["latency", "--model", f"{net}:needs_args", "--input-shape", "1x8x8"], ["--model"], "needs argument(s) width"),
        (["memory", "--model", f"{net}:not_a_module", "--input-shape", "1x8x8"], ["--model"], "returned str"),
        (["latency", "--model", f"{net}:build", "--input-shape", "1x8x8"], ["--classes", "--model"],
         "num_classes=10 but"),
        (["flops", "--model", f"{net}:build", "--input-shape", "1x9x9", "--classes", "5"], ["--input-shape"],
         "input_shape=(1, 9, 9) does not fit"),
        (["flops", "--model", f"{net}:build"], ["--model", "--input-shape"], "a model file's input is not known"),
    ]
    for argv, flags, message in cases:
        err = refused("bench", argv, user)
        assert message in err and all(flag in err for flag in flags), (argv, err)


# --- torch-free: the user's export benched in a runtime-only environment -------------------------------------------

CHILD = textwrap.dedent("""
    import json, sys
    from edgecl.bench.bench_cli import main
    code = main(sys.argv[1:])
    print("TORCH " + json.dumps("torch" in sys.modules), file=sys.stderr)
    sys.exit(code)
""")


@pytest.mark.skipif(not STOCK_PYTHON.exists(), reason="no .venv-stock-ort: ./bootstrap.sh test creates it")
@pytest.mark.parametrize("argv", [["latency", "--repeats", "3", "--warmup", "1", "--cold-starts", "1", "--device",
                                   "raspberry-pi-5"],
                                  ["memory", "--steps", "2"], ["flops"]], ids=["latency", "memory", "flops"])
def test_a_users_export_is_benched_where_torch_is_not_installed(user, argv):
    before = snapshot(user)
    art = str(user / "my-portable")
    out = subprocess.run([str(STOCK_PYTHON), "-c", CHILD, *argv, "--artifacts", art, "--json"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TORCH false" in out.stderr
    result = json.loads(out.stdout)
    if argv[0] == "flops":
        assert result["model"] == "my-portable" and result["flops"]["step"]["samples"] == 32
    else:
        measured = [r for r in result["rows"] if r["source"] == "measured"]
        assert {r["engine"] for r in measured} == {"portable"}
        assert all(r["model"] == "my-portable" for r in result["rows"])
        if argv[0] == "latency":  # the roofline from the manifest's layer table, no torch model needed
            assert {(r["engine"], r["target"]) for r in result["rows"] if r["source"] == "projected"} == {
                ("roofline", "raspberry-pi-5")}
        assert all(not r.get("torch_imported", False) for r in result["rows"])
    probe = subprocess.run([str(STOCK_PYTHON), "-c", "import importlib.util; print(importlib.util.find_spec('torch'))"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "None"  # torch is not installed there at all
    assert snapshot(user) == before
