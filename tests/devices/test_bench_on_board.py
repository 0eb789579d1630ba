"""`bench latency --device serial:PORT`: the same command, measured by an agent on the board."""

from __future__ import annotations

import json

import pytest

from edgecl.bench import bench_cli
from tests.devices.test_agent_e2e import board  # noqa: F401  (an agent process on a pty, per module)

pytestmark = pytest.mark.torch  # the host exports the model it pushes


def test_bench_latency_on_a_board_is_measured_there(board, capsys, tmp_path):
    argv = ["latency", "--model", "mlp", "--input-shape", "1x8x8", "--batch", "8", "--repeats", "5",
            "--warmup", "1", "--threads", "1", "--artifacts", str(tmp_path), "--device", f"serial:{board.relay.host_path}"]
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
    argv = ["latency", "--model", "mlp", "--input-shape", "1x8x8", "--artifacts", str(tmp_path),
            "--device", "serial:/dev/edgecl-no-such-port"]
    assert bench_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench latency: error:") and "/dev/edgecl-no-such-port" in err
