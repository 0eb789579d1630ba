"""Cross-architecture: the agent runs on emulated aarch64 (`.ci/arm.sh`: Debian bookworm arm64,
qemu-user through binfmt_misc, Python 3.11, stock onnxruntime, no torch) behind a pseudo-terminal.
This x86-64 host exports the MLP, pushes it and the digits, trains two tasks of Split Digits there and
reads back the metrics; the same run by an agent on this machine gives the reference. The first
training losses agree to 1e-4 relative, the final accuracies within 1 point: ARM and x86-64
kernels round differently, so bit-identity is not expected.

The pseudo-terminal pair is made here (tests/devices/relay.py); the emulated agent opens the
agent end by its /dev/pts path, which it sees because the chroot bind-mounts the host's /dev.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgecl.devices.host import Device
from edgecl.devices.jobs import DataSpec, TrainSpec
from edgecl.devices.link import Link, LinkError
from tests.devices.relay import Relay, agent_command

pytestmark = pytest.mark.arm

ARM_SH = Path(__file__).resolve().parents[2] / ".ci" / "arm.sh"
# Emulation is ~10-30x slower than native: acknowledgements and replies get room for that.
ACK_S, RETRIES, REPLY_S, START_S = 2.0, 5, 300.0, 240.0
SEED, EPOCHS, FIRST = 0, 2, 8


@pytest.fixture(scope="module")
def arm_ready():
    """The emulated root fs of `.ci/arm.sh setup` (which ./bootstrap.sh test runs as root)."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        pytest.skip(f"emulated aarch64 is set up for x86-64 Linux hosts, this is {sys.platform} {os.uname().machine}")
    ready = subprocess.run(["bash", str(ARM_SH), "ready"], capture_output=True).returncode == 0
    if not ready:
        message = "no emulated aarch64 root fs: run `.ci/arm.sh setup` as root (./bootstrap.sh test does)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run this test, not skip it
        pytest.skip(message)


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn", reason="the host loads the digits with scikit-learn")
    from edgecl.runtime.data import load_digits
    from edgecl.runtime.scenarios import train_test_split

    return train_test_split(load_digits(), 0.2, SEED)


class Board:
    """An agent process on one end of a pseudo-terminal pair; `emulated` runs it under .ci/arm.sh."""

    def __init__(self, workdir: Path, emulated: bool):
        self.relay, self.workdir, self.emulated = Relay(), workdir, emulated
        self.log_path = workdir.parent / f"agent-{'arm' if emulated else 'native'}.log"
        workdir.mkdir(parents=True)
        cmd = agent_command(self.relay.agent_path, workdir, ACK_S, RETRIES,
                            python="python3" if emulated else sys.executable)
        cmd[cmd.index("--progress") + 1] = "0"  # report every step's loss
        if emulated:  # the workdir is made visible at the same path inside the root fs
            cmd = ["bash", str(ARM_SH), "run", "--bind", str(workdir), "--", *cmd]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def device(self) -> Device:
        """A handshaken Device, waiting while the agent starts (emulated imports take seconds)."""
        device = Device(Link.open(self.relay.host_path, ack_timeout=ACK_S, retries=RETRIES), reply_timeout=REPLY_S)
        deadline = time.monotonic() + START_S
        while True:
            if self.proc.poll() is not None:
                device.close()
                pytest.fail(f"the agent exited with {self.proc.returncode}:\n{self.log()}")
            try:
                device.hello()
                return device
            except LinkError:
                if time.monotonic() > deadline:
                    device.close()
                    pytest.fail(f"no handshake with the agent within {START_S:.0f} s:\n{self.log()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        self.relay.close()


def train_two_tasks(board: Board, art: Path, digits) -> dict:
    """Push the artifact and the digits, train SparCL-DER++ 0.75 on 2 tasks; what the host reads back."""
    spec = TrainSpec(run="xarch", artifact="mlp", data=DataSpec("digits", tasks=2, classes_per_task=2, seed=SEED),
                     method="derpp", sparsity=0.75, buffer=200, epochs=EPOCHS, lr=0.1, seed=SEED, threads=1)
    losses = {}
    with board.device() as device:
        hello = device.hello()
        caps = device.capabilities()
        device.push(art, "artifact", "mlp")
        device.push_data(digits[0], digits[1], "digits")
        result = device.train(spec, lambda msg: losses.setdefault(msg["step"], msg["loss"]))
    return {"machine": hello.machine, "caps": caps, "losses": losses, "result": result}


def test_agent_on_emulated_aarch64_trains_like_the_native_one(arm_ready, exported, digits, tmp_path, record_property):
    _, art = exported("mlp")
    runs = {}
    for emulated in (False, True):
        board = Board(tmp_path / ("arm" if emulated else "native") / "work", emulated)
        try:
            runs[emulated] = train_two_tasks(board, art, digits)
        finally:
            board.close()
    native, arm = runs[False], runs[True]

    assert arm["machine"] == "aarch64" and native["machine"] == os.uname().machine
    assert arm["caps"]["engines"] == ["portable"]  # stock onnxruntime: no ort-training on ARM
    assert arm["result"].config["device"]["machine"] == "aarch64"

    first = sorted(native["losses"])[:FIRST]
    assert first == list(range(1, FIRST + 1)), sorted(native["losses"])[:20]
    assert set(first) <= set(arm["losses"]), sorted(arm["losses"])[:20]
    a = np.array([arm["losses"][s] for s in first])
    b = np.array([native["losses"][s] for s in first])
    record_property("first_losses_max_rel_diff", float(np.max(np.abs(a - b) / np.abs(b))))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=0)

    ra, rb = arm["result"], native["result"]
    assert ra.steps == rb.steps and np.shape(ra.acc_matrix) == np.shape(rb.acc_matrix) == (2, 2)
    np.testing.assert_allclose(ra.acc_matrix[-1], rb.acc_matrix[-1], rtol=0, atol=0.01)  # final accuracies
    record_property("final_acc_arm_native", (ra.acc_matrix[-1], rb.acc_matrix[-1]))
    print(f"first {FIRST} losses, max relative difference {np.max(np.abs(a - b) / np.abs(b)):.2e}; final accuracies "
          f"aarch64 {ra.acc_matrix[-1]} x86-64 {rb.acc_matrix[-1]}")
    assert abs(ra.acc - rb.acc) <= 0.01
    assert min(np.diag(rb.acc_matrix)) > 0.8  # each task was learnt, so agreement means something
