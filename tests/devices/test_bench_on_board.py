"""`bench latency` and `bench memory --device serial:PORT`: the same commands, measured by an agent on the board."""

from __future__ import annotations

import json

import pytest

from edgecl.bench import bench_cli
from tests.devices.test_agent_e2e import board  # noqa: F401  (an agent process on a pty, per module)

pytestmark = pytest.mark.torch  # the host exports the model it pushes


def test_bench_latency_on_a_board_is_measured_there(board, capsys, tmp_path):
    argv = ["latency", "--model", "mlp", "--input-shape", "1x8x8", "--batch", "8", "--repeats", "5",
            "--warmup", "1", "--threads", "1", "--cache", str(tmp_path), "--device", f"serial:{board.relay.host_path}"]
    assert bench_cli.main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    with board.device() as device:
        machine = device.capabilities()["machine"]
    rows = {r["phase"]: r for r in out["rows"]}
    assert set(rows) == {"train", "infer"}
    for row in rows.values():  # measured on the board, never projected, no torch there to compare with
        assert row["source"] == "measured" and row["target"] == f"board:{machine}"
        assert row["engine"] == "portable" and row["median_ms"] > 0 and row["ratio_to_torch"] is None
    assert "over the serial link" in out["projection_note"]

    assert bench_cli.main(argv) == 0  # the human table; the export and the pushed artifact are reused
    table = capsys.readouterr().out
    assert "measured" in table and f"board:{machine}" in table and "projected" not in table


def test_no_agent_on_the_port_is_a_clear_error(capsys, tmp_path):
    argv = ["latency", "--model", "mlp", "--input-shape", "1x8x8", "--cache", str(tmp_path),
            "--device", "serial:/dev/edgecl-no-such-port"]
    assert bench_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench latency: error:") and "/dev/edgecl-no-such-port" in err


def test_bench_memory_on_a_board_measures_a_fresh_process_there(board, capsys, tmp_path):
    argv = ["memory", "--model", "mlp", "--input-shape", "1x8x8", "--batch", "8", "--steps", "3", "--repeats", "2",
            "--threads", "1", "--cache", str(tmp_path), "--device", f"serial:{board.relay.host_path}"]
    assert bench_cli.main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    with board.device() as device:
        machine = device.capabilities()["machine"]
    [row] = out["rows"]
    assert (row["engine"], row["process"], row["source"], row["target"]) == (
        "portable", "runtime-only", "measured", f"board:{machine}")
    assert row["ratio_to_torch"] is None and row["torch_imported"] is False
    # a new interpreter's own figures, not the agent's: bare < after imports < peak
    assert 0 < row["interpreter_rss_bytes"] < row["imports_rss_bytes"] < row["peak_rss_bytes"]
    assert out["device"] == f"serial:{board.relay.host_path}"

    assert bench_cli.main(argv) == 0
    assert f"board:{machine}" in capsys.readouterr().out


def test_the_agent_probe_refuses_an_unknown_measurement(board, exported):
    from edgecl.devices import AgentError, MsgType, push_for_bench

    _, art = exported("mlp")
    with board.device() as device:
        name = push_for_bench(device, art)
        report = device.probe_process(name, batch=4, steps=2, threads=1)
        assert report.steps == 2 and report.first_step_ms > 0 and report.engine == "portable"
        with pytest.raises(AgentError, match="what='swap'; accepted: steps, fresh-process"):
            device.request(MsgType.BENCH, {"artifact": name, "what": "swap"})


def test_memory_is_never_projected_from_a_profile(capsys, tmp_path):
    argv = ["memory", "--model", "mlp", "--input-shape", "1x8x8", "--cache", str(tmp_path),
            "--device", "raspberry-pi-4"]
    assert bench_cli.main(argv) == 2
    assert "device='raspberry-pi-4'; accepted: serial:PORT" in capsys.readouterr().err


@pytest.mark.parametrize("fields, message", [
    ({"engines": ("portable", "torch")}, "engines=\\['portable', 'torch'\\], .* accepted: engines \\['portable'\\]"),
    ({"runtime_python": "/usr/bin/python3"}, "runtime_python='/usr/bin/python3'"),
    ({"batch": 1}, "batch=1 with device"),
    ({"device": "serial:"}, "device='serial:'; accepted: serial:PORT"),
])
def test_memory_on_a_board_refuses_what_the_board_cannot_do(fields, message):
    from edgecl.bench.memory import MemoryConfig

    with pytest.raises(ValueError, match=message):
        MemoryConfig("mlp", **{"device": "serial:/dev/ttyUSB0", **fields})
    assert MemoryConfig("mlp", device="serial:/dev/ttyUSB0").engines == ("portable",)


def test_a_reply_without_the_fields_is_a_protocol_error():
    from edgecl.devices.host import BoardProcess
    from edgecl.devices.link import ProtocolError

    step_reply = {"median_ms": 1.0, "iqr_ms": 0.1, "steps": 3, "batch": 8, "threads": 1, "engine": "portable",
                  "model": "mlp", "machine": "aarch64", "measured": True}  # what an agent of protocol 1 answers
    with pytest.raises(ProtocolError, match="lacks peak_rss_bytes, .* update the agent"):
        BoardProcess.from_reply(step_reply)
