"""The device side through Flower's own ClientApp: torch-free, state across rounds and restarts.

Runs on the emulated aarch64 board too (flwr without its simulation extra, stock onnxruntime, no
torch). A device's rounds go through `ClientApp.__call__` with Flower Messages; a device process
SIGKILLed in the middle of a round and restarted replies exactly as one never interrupted."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402

from edgecl.fleet.client import make_client_app, paths_from_node_config  # noqa: E402
from edgecl.fleet.codec import ModelSpec, dense_model  # noqa: E402
from edgecl.fleet.config import FleetConfig  # noqa: E402
from edgecl.fleet.records import from_record, to_record  # noqa: E402
from edgecl.fleet.scenario import dirichlet_fleet, write_client_files  # noqa: E402
from edgecl.runtime.manifest import load_manifest  # noqa: E402
from edgecl.runtime.open import open_engine  # noqa: E402
from tests.fleet.fleet_data import template_data  # noqa: E402
from tests.helpers import TIME_SCALE  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PYTHONPATH = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))
CONFIG = FleetConfig(clients=2, rounds=5, data="digits", buffer=40, sparsity=0.75, encoding="sparse", epochs=2)


@pytest.fixture
def device(tmp_path, exported):
    """Device 0's files: its stream, an empty state folder, the exported 8x8 cnn."""
    artifacts = exported("cnn")[1]
    scenario = dirichlet_fleet(template_data(800, 0), template_data(100, 1), CONFIG.clients, CONFIG.tasks,
                               alpha=CONFIG.alpha, seed=0)
    files = write_client_files(scenario, tmp_path / "data")
    return {"data-file": str(files[0]), "artifacts": str(artifacts), "partition-id": 0}


def initial_model(artifacts) -> dict[str, np.ndarray]:
    engine = open_engine(artifacts)
    spec = ModelSpec.from_manifest(load_manifest(artifacts))
    params = engine.parameters()
    return dense_model({n: params[n] for n in spec.weights}, engine.buffers())


def as_flower_task() -> None:
    """Messages carry their task's identity: Flower's runtimes set it in each ClientApp process
    (flwr.supernode.runtime.run_clientapp); a test that calls a ClientApp directly sets it too."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def instruction(server_round: int, model: dict) -> Message:
    config = ConfigRecord(CONFIG.client_settings() | {"server-round": server_round})
    return Message(content=RecordDict({"arrays": to_record(model), "config": config}), dst_node_id=1,
                   message_type=MessageType.TRAIN)


def run_round(node_config: dict, server_round: int, model: dict) -> dict:
    """One round through the ClientApp; returns the reply's arrays and metrics."""
    as_flower_task()
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    reply = make_client_app()(instruction(server_round, model), context)
    assert not reply.has_error(), reply.error
    return {"arrays": from_record(reply.content["arrays"]), "metrics": dict(reply.content["metrics"])}


def next_model(reply: dict) -> dict:
    """The next round's global model: here the device's own dense weights (any fixed rule will do)."""
    out = {}
    for k, v in reply["arrays"].items():
        if k.startswith(("w:", "b:")):
            out[k] = v
        elif k.startswith("v:"):
            name = k[2:]
            bits = np.unpackbits(reply["arrays"][f"m:{name}"])
            shape = reply["shape"][name]
            w = np.zeros(int(np.prod(shape)), np.float32)
            w[bits[: w.size].astype(bool)] = v
            out[f"w:{name}"] = w.reshape(shape)
    return out


def rounds(node_config: dict, artifacts, first: int, last: int, model: dict, shapes) -> tuple[list, dict]:
    replies = []
    for r in range(first, last + 1):
        reply = run_round(node_config, r, model) | {"shape": shapes}
        replies.append(reply)
        model = next_model(reply)
    return replies, model


def test_node_config_names_the_missing_keys():
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    with pytest.raises(KeyError, match="data-file.*state-dir.*artifacts"):
        paths_from_node_config(context)


def test_rounds_learn_the_arrived_examples_and_send_sparse_updates(tmp_path, device):
    node = device | {"state-dir": str(tmp_path / "state")}
    spec = ModelSpec.from_manifest(load_manifest(device["artifacts"]))
    replies, _ = rounds(node, device["artifacts"], 1, 5, initial_model(device["artifacts"]), spec.weights)
    n = [r["metrics"]["num-examples"] for r in replies]
    positions = [r["metrics"]["position"] for r in replies]
    assert positions == list(np.cumsum(n)) and sum(n) == positions[-1] > 0
    masked = [k[2:] for k in replies[-1]["arrays"] if k.startswith("m:")]
    assert masked and all(f"v:{name}" in replies[-1]["arrays"] for name in masked)
    for name in masked:  # SparCL's 75 % sparsity: about a quarter of each masked weight is sent
        density = np.unpackbits(replies[-1]["arrays"][f"m:{name}"])[: int(np.prod(spec.weights[name]))].mean()
        assert 0.1 < density < 0.5


DEVICE = textwrap.dedent("""
    import pickle, sys
    sys.modules["torch"] = None  # a device has no torch
    from tests.fleet.test_client import run_round
    node, server_round, model_file = pickle.loads(bytes.fromhex(sys.argv[1]))
    with open(model_file, "rb") as f:
        model = pickle.load(f)
    print("start", flush=True)
    run_round(node, server_round, model)
    print("done", flush=True)
""")


@pytest.mark.parametrize("delay_s", [0.1, 0.5, 1.5])
def test_a_device_killed_mid_round_resumes_exactly(tmp_path, device, delay_s):
    """Killed while opening, learning or saving, or after the save (then the retried round sends
    the saved model again): the replies of rounds 3-5 equal an uninterrupted device's."""
    spec = ModelSpec.from_manifest(load_manifest(device["artifacts"]))
    initial = initial_model(device["artifacts"])
    whole = device | {"state-dir": str(tmp_path / "whole")}
    expected, _ = rounds(whole, device["artifacts"], 1, 5, initial, spec.weights)

    killed = device | {"state-dir": str(tmp_path / "killed")}
    _, model = rounds(killed, device["artifacts"], 1, 2, initial, spec.weights)
    model_file = tmp_path / "model.pkl"
    model_file.write_bytes(pickle.dumps(model))
    arg = pickle.dumps((killed, 3, str(model_file))).hex()
    proc = subprocess.Popen([sys.executable, "-c", DEVICE, arg], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": PYTHONPATH})
    assert proc.stdout.readline().strip() == "start", proc.stderr.read()
    time.sleep(delay_s * TIME_SCALE)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # restarted: round 3 again, then 4 and 5, from the killed device's state folder
    resumed, _ = rounds(killed, device["artifacts"], 3, 5, model, spec.weights)
    for a, b in zip(expected[2:], resumed):
        assert a["metrics"] == b["metrics"]
        assert sorted(a["arrays"]) == sorted(b["arrays"])
        for k in a["arrays"]:
            assert np.array_equal(a["arrays"][k], b["arrays"][k]), k
