"""The link under faults injected between host and agent: flipped bytes, dropped bytes, garbage, a
line held longer than the timeout, a dead line, an agent killed mid-transfer. In every case the
transfer completes correctly or both sides say what failed, and nothing partial is ever kept."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading

import numpy as np
import pytest

from edgecl.devices.agent import Agent
from edgecl.devices.host import Device, connect
from edgecl.devices.link import AgentError, Link, LinkTimeout, MsgType
from edgecl.devices.transfer import folder_specs
from edgecl.runtime.manifest import load_manifest
from tests.devices.relay import Relay, agent_command
from tests.helpers import TIME_SCALE

# The fault tests place faults relative to ACK_S (and the agent's 1 s transfer timeout): they keep
# these native values under emulation too, where they pass. Only waits for an answer that must come
# are multiplied by TIME_SCALE (emulated runs are that many times slower).
ACK_S, RETRIES = 0.2, 3
REPLY_S = 5 * TIME_SCALE
CHUNK = 1024


class LogLines:
    def __init__(self):
        self.lines = []

    def write(self, text):
        self.lines.append(text)

    def flush(self):
        pass

    def __str__(self):
        return "".join(self.lines)


@pytest.fixture
def line():
    relay = Relay()
    yield relay
    relay.close()


@pytest.fixture
def agent(line, tmp_path):
    """An agent serving in a thread on the relay's far end (its link stats are visible)."""
    log = LogLines()
    a = Agent(Link.open(line.agent_path, ack_timeout=ACK_S, retries=RETRIES, name="agent"), tmp_path / "board",
              progress_s=0.05, transfer_timeout_s=1.0, chunk_bytes=CHUNK, log=log)
    thread = threading.Thread(target=a.serve, daemon=True)
    thread.start()
    a.log_text = log
    yield a
    a.stop()
    thread.join(timeout=5)
    a.link.close()


def wait_for_log(agent, text: str, polls: int = 200) -> None:
    """Poll the agent's log (every 50 ms) until `text` shows up or the polls run out."""
    for _ in range(polls):
        if text in str(agent.log_text):
            return
        threading.Event().wait(0.05)


def host(line, reply_timeout=REPLY_S) -> Device:
    return connect(line.host_path, ack_timeout=ACK_S, retries=RETRIES, reply_timeout=reply_timeout)


@pytest.fixture
def payload(tmp_path):
    """A flat folder of three files, 13 KiB in all (13 chunks of 1 KiB)."""
    folder = tmp_path / "payload"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a.bin", 9000), ("b.bin", 4000), ("empty.bin", 0)):
        (folder / name).write_bytes(rng.bytes(size))
    return folder


def same_files(a, b) -> bool:
    return [s.to_dict() for s in folder_specs(a)] == [s.to_dict() for s in folder_specs(b)]


def test_clean_line_pushes_the_files(line, agent, payload):
    with host(line) as board:
        result = board.push(payload, "data", "p", chunk_bytes=CHUNK)
        assert board.link.stats.damaged == board.link.stats.garbage_bytes == 0
    assert result.files == 3 and result.bytes == 13000
    assert agent.link.stats.damaged == agent.link.stats.garbage_bytes == 0
    assert same_files(payload, agent.workdir / "data" / "p")


@pytest.mark.parametrize("direction, skip", [("to_agent", 3000), ("to_agent", 9000), ("to_host", 40)])
def test_flipped_byte_is_detected_and_resent(line, agent, payload, direction, skip):
    with host(line) as board:
        line.after(direction, skip, flip=True)
        board.push(payload, "data", "p", chunk_bytes=CHUNK)
        damaged = agent.link.stats.damaged + agent.link.stats.garbage_bytes + board.link.stats.damaged
        assert board.link.stats.retransmits + agent.link.stats.retransmits >= 1 and damaged >= 1
    assert same_files(payload, agent.workdir / "data" / "p")


def test_dropped_bytes_of_a_chunk_are_resent(line, agent, payload):
    with host(line) as board:
        line.after("to_agent", 4000, drop=300)
        board.push(payload, "data", "p", chunk_bytes=CHUNK)
        assert board.link.stats.retransmits >= 1
    assert same_files(payload, agent.workdir / "data" / "p")


def test_garbage_on_the_line_is_skipped(line, agent, payload):
    with host(line) as board:
        line.inject("to_agent", b"\x00noise EdC\xff" * 10)
        board.push(payload, "data", "p", chunk_bytes=CHUNK)
    assert agent.link.stats.garbage_bytes >= 110
    assert same_files(payload, agent.workdir / "data" / "p")


def test_delay_longer_than_the_ack_timeout_resends_and_drops_duplicates(line, agent, payload):
    with host(line) as board:
        line.after("to_host", 30, hold_s=2.5 * ACK_S)  # what the agent sends comes late: resent
        board.push(payload, "data", "p", chunk_bytes=CHUNK)
        assert board.link.stats.retransmits + agent.link.stats.retransmits >= 1
        # The late originals and the resent copies both arrive: one is acknowledged and dropped.
        assert board.link.stats.duplicates + agent.link.stats.duplicates >= 1
    assert same_files(payload, agent.workdir / "data" / "p")


def test_dead_line_fails_cleanly_keeps_nothing_and_recovers(line, agent, payload):
    board = host(line)
    line.after("to_agent", 5000, cut=True)
    with pytest.raises(LinkTimeout, match=r"push of data 'p' stopped at a.bin byte .* after 4 attempts"):
        board.push(payload, "data", "p", chunk_bytes=CHUNK)
    assert not (agent.workdir / "data" / "p").exists()
    wait_for_log(agent, "abandoned")  # the agent, too, says the transfer stopped, and drops the partial files
    assert "transfer of data 'p' abandoned: no data for 1.0 s" in str(agent.log_text)
    assert list((agent.workdir / ".incoming").iterdir()) == []
    line.heal()
    board.close()
    with host(line) as board:  # a new session abandons the half transfer and starts over
        board.push(payload, "data", "p", chunk_bytes=CHUNK)
    assert same_files(payload, agent.workdir / "data" / "p")
    assert list((agent.workdir / ".incoming").iterdir()) == []


def test_host_gone_before_the_reply_both_sides_say_so(line, agent, payload):
    from edgecl.devices.transfer import encode_chunk

    board = host(line, reply_timeout=1.5)
    board.request(MsgType.PUT, {"kind": "data", "name": "p", "files": [s.to_dict() for s in folder_specs(payload)]})
    for index, name in enumerate(["a.bin", "b.bin"]):
        board.link.send(MsgType.CHUNK, encode_chunk(index, 0, (payload / name).read_bytes()))
    line.after("to_host", 0, cut=True)  # from now on the host hears nothing
    with pytest.raises(LinkTimeout, match="PUT_END"):
        board.request(MsgType.PUT_END)
    board.close()
    wait_for_log(agent, "link failed")  # the agent gives up on its reply after its own retries
    assert "PUT_END: link failed: agent: no acknowledgement of OK" in str(agent.log_text)
    assert same_files(payload, agent.workdir / "data" / "p")  # complete and checked: kept


def test_wrong_sha256_is_refused_and_nothing_kept(line, agent, payload, tmp_path):
    specs = [s.to_dict() for s in folder_specs(payload)]
    specs[0]["sha256"] = hashlib.sha256(b"something else").hexdigest()
    with host(line) as board:
        board.request(MsgType.PUT, {"kind": "data", "name": "p", "files": specs})
        for index, name in enumerate(["a.bin", "b.bin"]):
            data = (payload / name).read_bytes()
            from edgecl.devices.transfer import encode_chunk
            board.link.send(MsgType.CHUNK, encode_chunk(index, 0, data))
        with pytest.raises(AgentError, match="a.bin.*sha256.*nothing kept"):
            board.request(MsgType.PUT_END)
        assert not (agent.workdir / "data" / "p").exists()
        board.push(payload, "data", "p", chunk_bytes=CHUNK)  # the next push goes through
    assert same_files(payload, agent.workdir / "data" / "p")


def test_other_protocol_version_is_refused(line, agent):
    from edgecl.devices.agent import PROTOCOL_VERSION

    with host(line) as board:
        with pytest.raises(AgentError, match=f"host speaks protocol 99; this agent speaks {PROTOCOL_VERSION}"):
            board.request(MsgType.HELLO, {"protocol": 99})


def test_artifact_with_an_altered_manifest_file_is_refused(line, agent, payload):
    (payload / "manifest.json").write_text('{"engine": "portable"}')
    with host(line) as board:
        with pytest.raises(AgentError, match="ArtifactError"):
            board.push(payload, "artifact", "bad", chunk_bytes=CHUNK)
    assert not (agent.workdir / "artifacts" / "bad").exists()


def synthetic_artifact(folder, seed: int):
    """An artifact folder the agent accepts: a 70 kB file, the files a portable manifest must list (random
    bytes: the agent checks their sha256, it does not open them) and a manifest with their sha256."""
    from edgecl.runtime.manifest import Manifest, TensorSpec, file_entries

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    (folder / "weights.bin").write_bytes(rng.bytes(70_000))
    names = ["weights.bin", "init_state.npz", "model.onnx", "step.onnx", "forward.onnx"]
    for name in names[1:]:
        (folder / name).write_bytes(rng.bytes(64))
    state = ["param::w"]
    extra = {"step_inputs": ["x", "y", "sample_weight", "target_logits", "logit_weight", *state],
             "step_outputs": ["loss", "logits", "grad::w"], "forward_inputs": ["x", *state]}
    Manifest("portable", (1, 8, 8), 10, (TensorSpec("w", (10, 64)),), files=file_entries(folder, names),
             extra=extra).write(folder)
    return folder


@pytest.mark.parametrize("fault", ["manifest-edited", "digest-missing"])
def test_artifact_whose_manifest_does_not_match_its_digest_is_refused(line, agent, tmp_path, fault):
    import json

    folder = synthetic_artifact(tmp_path / "art", 0)
    if fault == "manifest-edited":  # every file's sha256 still checks; the manifest's own does not
        manifest = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**manifest, "files": {}}))
    else:
        (folder / "manifest.sha256").unlink()
    with host(line) as board:
        with pytest.raises(AgentError, match=r"ArtifactError.*manifest"):
            board.push(folder, "artifact", "bad", chunk_bytes=CHUNK)
    assert not (agent.workdir / "artifacts" / "bad").exists()


def test_a_kept_artifact_keeps_its_manifest_digest(line, agent, tmp_path):
    folder = synthetic_artifact(tmp_path / "art", 0)
    with host(line) as board:
        board.push(folder, "artifact", "good", chunk_bytes=CHUNK)
    kept = agent.workdir / "artifacts" / "good"
    assert (kept / "manifest.sha256").read_bytes() == (folder / "manifest.sha256").read_bytes()
    load_manifest(kept)


def test_agent_killed_mid_transfer_then_restarted(line, tmp_path):
    old, new = synthetic_artifact(tmp_path / "v1", 1), synthetic_artifact(tmp_path / "v2", 2)
    workdir = tmp_path / "board"
    log = open(tmp_path / "agent.log", "a")
    proc = subprocess.Popen(agent_command(line.agent_path, workdir, ACK_S, RETRIES), stderr=log)
    try:
        board = Device(Link.open(line.host_path, ack_timeout=ACK_S, retries=RETRIES), reply_timeout=REPLY_S)
        _hello_when_up(board)
        board.push(old, "artifact", "net", chunk_bytes=CHUNK)  # a first, complete version
        line.after("to_agent", 40_000, action=lambda: os.kill(proc.pid, signal.SIGKILL))
        with pytest.raises(LinkTimeout, match="push of artifact 'net' stopped at weights.bin byte"):
            board.push(new, "artifact", "net", chunk_bytes=CHUNK)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        # The killed agent left its partial copy under .incoming; the artifact is the old version, whole.
        assert any((workdir / ".incoming").iterdir())
        assert same_files(old, workdir / "artifacts" / "net")
        load_manifest(workdir / "artifacts" / "net")  # verifies every sha256
        line.heal()
        proc = subprocess.Popen(agent_command(line.agent_path, workdir, ACK_S, RETRIES), stderr=log)
        _hello_when_up(board)
        assert not any((workdir / ".incoming").iterdir())  # cleared at start
        board.push(new, "artifact", "net", chunk_bytes=CHUNK)
        assert same_files(new, workdir / "artifacts" / "net")
        assert board.capabilities()["artifacts"] == ["net"]
        board.close()
    finally:
        proc.kill()
        proc.wait(timeout=10)
        log.close()


def _hello_when_up(board: Device, within_s: float = 180.0) -> None:
    """Handshake, retrying while the agent process starts (imports take seconds, minutes emulated)."""
    import time

    give_up = time.monotonic() + within_s
    while time.monotonic() < give_up:
        try:
            board.hello()
            return
        except LinkTimeout:
            continue
    board.hello()


def test_socket_url_carries_the_same_protocol(tmp_path, payload):
    """socket://HOST:PORT (e.g. a UART served by ser2net): a TCP bridge joins the two clients."""
    import socket

    server = socket.create_server(("127.0.0.1", 0))
    url = f"socket://127.0.0.1:{server.getsockname()[1]}"
    ends = []

    def bridge():
        ends.extend(server.accept()[0] for _ in range(2))
        a, b = ends
        import select
        while True:
            ready, _, _ = select.select([a, b], [], [], 0.1)
            for s in ready:
                data = s.recv(65536)
                if not data:
                    return
                (b if s is a else a).sendall(data)

    threading.Thread(target=bridge, daemon=True).start()
    # Nothing is lost on this line, so the acknowledgement timeout only has to outlast the slowest
    # answer: host, agent and bridge share one process (one GIL), which emulated is TIME_SCALE times slower.
    ack_s = ACK_S * TIME_SCALE
    a = Agent(Link.open(url, ack_timeout=ack_s, retries=RETRIES, name="agent"), tmp_path / "board", log=LogLines())
    thread = threading.Thread(target=a.serve, daemon=True)
    thread.start()
    try:
        with connect(url, ack_timeout=ack_s, retries=RETRIES, reply_timeout=REPLY_S) as board:
            board.push(payload, "data", "p", chunk_bytes=CHUNK)
        assert same_files(payload, a.workdir / "data" / "p")
    finally:
        a.stop()
        thread.join(timeout=5)
        a.link.close()
        for s in ends + [server]:
            s.close()
