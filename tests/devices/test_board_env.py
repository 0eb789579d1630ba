"""`.venv-stock-ort` is what a board installs: the package's own dependencies as they resolve on an
aarch64 board (stock onnxruntime, pyserial, numpy, tqdm; no torch), and the agent serves from it."""

from __future__ import annotations

import json
import platform
import subprocess
import tomllib
from pathlib import Path

import pytest

from edgecl.devices.host import Device
from edgecl.devices.link import Link
from tests.devices.relay import Relay, agent_command
from tests.devices.test_faults import _hello_when_up

ROOT = Path(__file__).resolve().parents[2]
STOCK = ROOT / ".venv-stock-ort" / "bin"
pytestmark = pytest.mark.skipif(platform.machine() != "x86_64" or not (STOCK / "python").exists(),
                                reason="no .venv-stock-ort (./bootstrap.sh test creates it on the x86-64 host)")

DISTRIBUTIONS = """
import json
from importlib.metadata import distributions
print(json.dumps({d.metadata["Name"].lower(): d.version for d in distributions()}))
"""


def board_requirements():
    """pyproject's dependencies whose markers hold on an aarch64 Linux board with this Python."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = {**default_environment(), "platform_machine": "aarch64"}
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [r for r in map(Requirement, deps) if r.marker is None or r.marker.evaluate(env)]


def test_the_stock_venv_holds_what_a_board_installs():
    out = subprocess.run([str(STOCK / "python"), "-c", DISTRIBUTIONS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    installed = json.loads(out.stdout)
    requirements = board_requirements()
    assert {r.name for r in requirements} >= {"numpy", "pyserial", "onnxruntime", "tqdm"}
    for req in requirements:
        assert req.name in installed, f"{req} (a board installs it) is missing from .venv-stock-ort"
        assert req.specifier.contains(installed[req.name], prereleases=True), (req, installed[req.name])
    assert "onnxruntime-training-cpu" not in installed and "torch" not in installed and "onnx" not in installed


@pytest.mark.torch  # the host exports the model it pushes
def test_the_agent_serves_from_the_stock_venv(exported, tmp_path):
    help_run = subprocess.run([str(STOCK / "edgecl-agent"), "--help"], capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0 and "--port" in help_run.stdout, help_run.stderr[-2000:]
    _, art = exported("mlp")
    relay = Relay()
    log = open(tmp_path / "agent.log", "w")
    proc = subprocess.Popen(agent_command(relay.agent_path, tmp_path / "board", python=str(STOCK / "python")),
                            stderr=log)
    try:
        with Device(Link.open(relay.host_path, ack_timeout=0.3, retries=4), reply_timeout=30) as device:
            _hello_when_up(device)
            caps = device.capabilities()
            assert caps["engines"] == ["portable"] and caps["onnxruntime"] != "1.19.2"
            device.push(art, "artifact", "mlp")  # checked on the board: every sha256 and the manifest's own
            assert (tmp_path / "board" / "artifacts" / "mlp" / "manifest.sha256").is_file()
            latency = device.bench("mlp", batch=8, steps=3, warmup=1, threads=1)
            assert latency.engine == "portable"
    finally:
        proc.kill()
        proc.wait(timeout=10)
        relay.close()
        log.close()
    assert "pyserial" not in (tmp_path / "agent.log").read_text()
