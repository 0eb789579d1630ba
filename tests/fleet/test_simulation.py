"""A fleet end to end on Flower's simulation engine (`flwr.simulation.run_simulation`), and the
faults a fleet meets: a device dropping out mid-round, a straggler past the round timeout, a
malformed update and a non-finite one. No mocks: Flower's ServerApp, ClientApp, strategies and
simulation engine, with a ClientApp wrapping the real one to inject each fault."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")  # Flower's simulation engine (flwr[simulation]); a device has flwr alone

from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from edgecl.fleet import simulate as simulate_module  # noqa: E402
from edgecl.fleet.client import handle_train  # noqa: E402
from edgecl.fleet.prepare import client_paths  # noqa: E402
from edgecl.fleet.scenario import ClientStream  # noqa: E402
from edgecl.fleet.server import GLOBAL_FILE, RESULT_FILE, read_run  # noqa: E402
from edgecl.fleet.simulate import simulate  # noqa: E402
from edgecl.runtime.online import open_learner  # noqa: E402
from tests.fleet.fleet_data import make_run  # noqa: E402


@pytest.fixture
def cnn(exported):
    return exported("cnn")[1]


def positions(run_dir) -> list[int]:
    """Each device's saved stream position, read from its state folder."""
    run = read_run(run_dir)
    out = []
    for k in range(run["config"].clients):
        paths = client_paths(run_dir, k, run["artifacts"])
        settings = run["config"].online_config().to_dict()
        with open_learner(paths.artifacts, paths.state_dir, **settings) as learner:
            out.append(int(learner.app_state["position"]))
    return out


def stream_lengths(run_dir) -> list[int]:
    run = read_run(run_dir)
    return [len(ClientStream.load(client_paths(run_dir, k, run["artifacts"]).data_file).y)
            for k in range(run["config"].clients)]


def test_a_short_simulation_end_to_end(tmp_path, cnn):
    run_dir = make_run(tmp_path, cnn, clients=3, rounds=5, epochs=2)
    rounds_seen = []
    environment = dict(os.environ)
    result = simulate(run_dir, workers=2, on_round=lambda r, row: rounds_seen.append(r))
    assert dict(os.environ) == environment  # Ray's and the workers' variables do not leak to the caller
    assert rounds_seen == [1, 2, 3, 4, 5]
    assert json.loads((run_dir / RESULT_FILE).read_text()) == result
    for key in ("acc", "acc_matrix", "forgetting", "bytes_sent_per_round", "config"):
        assert key in result
    matrix = np.array(result["acc_matrix"])
    assert matrix.shape == (5, 5) and np.isfinite(matrix).all()
    assert 0.0 <= result["acc"] <= 1.0 and result["forgetting"] is not None
    assert result["config"]["clients"] == 3
    # the model learned: after the first task its classes are recognised well above chance
    assert matrix[0, 0] > 0.6
    assert len(result["bytes_sent_per_round"]) == 5
    for row in result["rounds"]:
        assert row["sampled"] == 3 and row["aggregated"] == 3 and not row["refused"]
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
    # every device saved its whole stream as learned, and the final model is on disk
    assert positions(run_dir) == stream_lengths(run_dir)
    with np.load(run_dir / GLOBAL_FILE) as z:
        assert all(np.isfinite(z[k]).all() for k in z.files)


def test_sparse_devices_send_fewer_bytes_and_8_bit_fewer_still(tmp_path, cnn):
    sent = {}
    for encoding in ("dense", "sparse", "sparse-q8"):
        result = simulate(make_run(tmp_path / encoding, cnn, clients=2, rounds=5, sparsity=0.75, encoding=encoding),
                          workers=2)
        sent[encoding] = result["bytes_up_per_round"][-1]
        assert np.isfinite(result["acc"])
    assert sent["sparse-q8"] < sent["sparse"] < sent["dense"]
    assert sent["sparse"] < 0.5 * sent["dense"]


FAULTS = {(1, 2): "dropout", (2, 3): "straggler", (0, 2): "nan", (2, 4): "malformed"}
TIMEOUT_S = 15.0  # the first round includes the engine workers starting up


def faulty_app(run_dir, artifacts):
    """The real ClientApp's handler, with one fault per (partition, round) of FAULTS."""
    resolve = simulate_module._resolver(run_dir, artifacts)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        fault = FAULTS.get((int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"])))
        if fault == "dropout":
            raise RuntimeError("the device dropped out mid-round")
        if fault == "straggler":
            time.sleep(TIMEOUT_S + 4)
        reply = handle_train(msg, context, resolve)
        arrays = reply.content["arrays"]
        if fault == "nan":
            key = next(k for k in arrays if k.startswith("w:"))
            w = arrays[key].numpy().copy()
            w.flat[0] = np.nan
            from flwr.app import Array

            arrays[key] = Array(w)
        if fault == "malformed":
            key = next(k for k in arrays if k.startswith("w:"))
            from flwr.app import Array

            arrays[key] = Array(np.zeros(3, np.float32))
        return reply

    return app


def test_faults_refused_or_survived_and_the_global_model_stays_sound(tmp_path, cnn, monkeypatch):
    run_dir = make_run(tmp_path, cnn, clients=3, rounds=5, round_timeout_s=TIMEOUT_S)
    run = read_run(run_dir)
    monkeypatch.setattr(simulate_module, "make_client_app", lambda resolve: faulty_app(run_dir, run["artifacts"]))
    result = simulate(run_dir, workers=3)
    rounds = {row["round"]: row for row in result["rounds"]}
    assert rounds[2]["failed"] == 1  # the dropout
    assert [r["partition"] for r in rounds[2]["refused"]] == [0]  # the NaN update
    assert "nan" in rounds[2]["refused"][0]["reason"]
    assert rounds[2]["aggregated"] == 1
    assert rounds[3]["timed_out"] == 1 and rounds[3]["aggregated"] == 2  # the straggler
    assert [r["partition"] for r in rounds[4]["refused"]] == [2]  # the malformed update
    assert "shape" in rounds[4]["refused"][0]["reason"] or "(3,)" in rounds[4]["refused"][0]["reason"]
    assert rounds[1]["aggregated"] == 3 and rounds[5]["aggregated"] == 3
    with np.load(run_dir / GLOBAL_FILE) as z:
        assert all(np.isfinite(z[k]).all() for k in z.files)
    assert np.isfinite(result["acc"]) and np.isfinite(np.array(result["acc_matrix"])).all()
    # the device that dropped out in round 2 learned its missed examples in round 3: all learned
    assert positions(run_dir) == stream_lengths(run_dir)
