"""`bench flops` and `bench devices`: through the library and the CLI, against torch's FLOP counter."""

from __future__ import annotations

import csv
import io
import json

import pytest

from edgecl.bench import bench_cli
from edgecl.bench.devices_table import devices_table, format_table as devices_format
from edgecl.bench.flops_report import flops_report, format_table, to_csv
from edgecl.devices.profiles import builtin_profiles
from edgecl.runtime.flops import SparsityConfig

CASES = [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)), ("resnet", (1, 8, 8)), ("mobilenet", (1, 8, 8)), ("cnn", (1, 28, 28)),
         ("resnet18", (3, 32, 32)), ("mobilenetv2", (3, 32, 32))]
GROUPED = ("mobilenet", "mobilenetv2")  # the families with depthwise convolutions


@pytest.mark.torch
@pytest.mark.parametrize("family, shape", CASES)
def test_dense_forward_and_backward_match_torch_flop_counter(family, shape):
    """Forward and backward of one dense step, each against FlopCounterMode (1 %).

    torch 2.13 prices a grouped convolution's input-gradient as if dense (groups times too
    high, see tests/runtime/test_flops.py); the MobileNets' backward adds that overcount.
    """
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode

    from edgecl.exporters.models import build_model

    batch = 8
    report = flops_report(family, shape, batch=batch, examples_per_epoch=batch)
    model = build_model(family, shape, 10, seed=0).train()
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as fwd:
        loss = torch.nn.functional.cross_entropy(model(x), y)
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    step = report.flops.step
    assert step.samples == batch and step.forward == pytest.approx(fwd.get_total_flops(), rel=0.01)
    overcount = sum((r["groups"] - 1) * 2 * r["macs_per_sample"] * batch for r in report.layers if r["needs_input_grad"])
    assert (family in GROUPED) == (overcount > 0)
    assert step.backward + overcount == pytest.approx(bwd.get_total_flops(), rel=0.01) or (
        step.backward == pytest.approx(bwd.get_total_flops(), rel=0.01))


def test_cli_json_matches_library(exported, capsys):
    _, folder = exported("cnn", "portable")
    assert bench_cli.main(["flops", "--artifacts", str(folder), "--batch", "16", "--replay", "32", "--examples", "100",
                           "--epochs", "2", "--tasks", "3", "--sparsity", "0.75", "--grad-density", "0.2",
                           "--data-removal", "0.3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    lib = flops_report(artifacts=folder, sparsity=SparsityConfig(0.75, 0.2, 0.3), batch=16, replay=32,
                       examples_per_epoch=100, epochs=2, tasks=3)
    assert out["flops"] == json.loads(json.dumps(lib.flops.to_dict()))
    assert out["flops"]["steps_per_epoch"] == 5 and out["flops"]["run"]["steps"] == 30
    assert out["projected_step_latency"] is None


def test_cli_table_csv_and_projected_device(exported, capsys):
    _, folder = exported("cnn", "portable")
    assert bench_cli.main(["flops", "--artifacts", str(folder), "--device", "raspberry-pi-5"]) == 0
    table = capsys.readouterr().out
    assert "PROJECTED (raspberry-pi-5)" in table and "PROJECTED (roofline, not measured)" in table
    assert "per run" in table and "optimizer" in table
    assert bench_cli.main(["flops", "--artifacts", str(folder), "--device", "raspberry-pi-5", "--json"]) == 0
    proj = json.loads(capsys.readouterr().out)["projected_step_latency"]
    assert proj["source"] == "projected" and proj["device"] == "raspberry-pi-5" and proj["per_step_ms"] > 0
    assert bench_cli.main(["flops", "--artifacts", str(folder), "--csv", "--device", "raspberry-pi-4"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    n_layers = len(proj["layers"])
    assert len(rows) == 3 * n_layers and {r["scope"] for r in rows} == {"step", "epoch", "run"}
    assert all(r["projected_device"] == "raspberry-pi-4" for r in rows if r["scope"] == "step")
    assert all(r["projected_ms"] == "" for r in rows if r["scope"] != "step")  # projections only for one step


def test_library_formatting_and_sparser_is_cheaper(exported):
    _, folder = exported("cnn", "portable")
    dense = flops_report(artifacts=folder)
    sparse = flops_report(artifacts=folder, sparsity=SparsityConfig(0.9, 0.2, 0.3), device=builtin_profiles()["raspberry-pi-4"])
    assert sparse.flops.run.total < dense.flops.run.total
    assert sparse.projection.source == "projected"
    assert "raspberry-pi-4" in format_table(sparse) and to_csv(dense).startswith("scope,layer,forward")


@pytest.mark.parametrize("argv, message", [
    (["--device", "pi-9"], "device profile 'pi-9' is unknown; accepted: "),
    (["--grad-density", "-0.5"], r"grad_density=-0.5; accepted: a number in [0, 1]"),
    (["--sparsity", "1.5"], "weight_sparsity=1.5"),
    (["--frozen", "nope.weight"], "frozen names ['nope.weight'] are not layer weights"),
    (["--batch", "0"], "batch=0"),
])
def test_cli_bad_input_exits_2_with_the_reason(exported, capsys, argv, message):
    _, folder = exported("cnn", "portable")
    assert bench_cli.main(["flops", "--artifacts", str(folder), *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_bad_shape_and_missing_artifacts(tmp_path, capsys):
    assert bench_cli.main(["flops", "--input-shape", "1x28"]) == 2
    assert "input_shape=(1, 28)" in capsys.readouterr().err
    assert bench_cli.main(["flops", "--artifacts", str(tmp_path / "none")]) == 2
    assert "manifest" in capsys.readouterr().err


def test_cli_user_profile_for_projection(exported, tmp_path, capsys):
    _, folder = exported("cnn", "portable")
    path = tmp_path / "board.toml"
    path.write_text(builtin_profiles()["raspberry-pi-4"].to_toml().replace('"raspberry-pi-4"', '"my-pi"'))
    assert bench_cli.main(["flops", "--artifacts", str(folder), "--profile", str(path), "--device", "my-pi", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["projected_step_latency"]["device"] == "my-pi"


# --- bench devices -----------------------------------------------------------------------


def test_devices_cli_and_library(tmp_path, capsys):
    cache = tmp_path / "host.toml"
    user = tmp_path / "mine.toml"
    user.write_text(builtin_profiles()["raspberry-pi-5"].to_toml().replace('"raspberry-pi-5"', '"mine"'))
    assert bench_cli.main(["devices", "--cache", str(cache), "--profile", str(user), "--json"]) == 0
    names = [p["name"] for p in json.loads(capsys.readouterr().out)["profiles"]]
    assert names[-2:] == ["host", "mine"] and {"raspberry-pi-4", "jetson-orin-nano-gpu"} <= set(names)
    assert cache.is_file()  # the host was probed once and kept
    first = cache.read_text()
    assert bench_cli.main(["devices", "--cache", str(cache)]) == 0
    table = capsys.readouterr().out
    assert "host" in table and "(m)" in table and "(d)" in table
    assert cache.read_text() == first  # no new probe without --probe
    lib = devices_table(cache=cache)
    assert lib.get("host").measured and not lib.get("raspberry-pi-4").measured
    assert "snapdragon-8-gen-2-cpu" in devices_format(lib)
    assert bench_cli.main(["devices", "--no-host", "--json"]) == 0
    assert "host" not in [p["name"] for p in json.loads(capsys.readouterr().out)["profiles"]]


def test_devices_cli_probe_and_bad_profile(tmp_path, capsys):
    cache = tmp_path / "host.toml"
    assert bench_cli.main(["devices", "--cache", str(cache), "--probe", "--threads", "1", "--json"]) == 0
    host = [p for p in json.loads(capsys.readouterr().out)["profiles"] if p["name"] == "host"][0]
    assert host["peak_gflops"]["source"] == "measured" and "1 BLAS threads" in host["peak_gflops"]["reference"]
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\ndescription = "d"\narch = "a"\nkind = "cpu"\n')
    assert bench_cli.main(["devices", "--no-host", "--profile", str(bad)]) == 2
    assert "lacks key(s) ['cores', 'ram_bytes', 'peak_gflops', 'bandwidth_gbps']" in capsys.readouterr().err
    assert bench_cli.main(["devices", "--no-host", "--profile", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
