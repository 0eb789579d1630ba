"""The server's strategies on Flower Messages: what is aggregated, what is refused, and that a
refused update leaves no trace in the global model."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Error, Message, MessageType, MetricRecord, RecordDict  # noqa: E402

from edgecl.fleet.aggregate import masked_average  # noqa: E402
from edgecl.fleet.codec import ModelSpec, decode_update, encode_update  # noqa: E402
from edgecl.fleet.records import from_record, to_record  # noqa: E402
from edgecl.fleet.strategy import FleetFedAvg, FleetFedProx, build_strategy  # noqa: E402
from tests.fleet.test_client import as_flower_task  # noqa: E402

SPEC = ModelSpec({"conv.weight": (4, 1, 3, 3), "fc.bias": (10,)}, frozenset({"conv.weight"}), {})
RNG = np.random.default_rng(0)
GLOBAL = {n: RNG.standard_normal(s).astype(np.float32) for n, s in SPEC.weights.items()}


def reply(partition: int, n: float, arrays: dict) -> Message:
    as_flower_task()
    content = RecordDict({"arrays": to_record(arrays),
                          "metrics": MetricRecord({"num-examples": n, "partition-id": partition})})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def device(seed: int, encoding: str = "sparse") -> dict:
    rng = np.random.default_rng(seed)
    weights = {n: rng.standard_normal(s).astype(np.float32) for n, s in SPEC.weights.items()}
    mask = (rng.random(SPEC.weights["conv.weight"]) < 0.25).astype(np.float32)
    weights["conv.weight"] *= mask
    return encode_update(weights, {}, {"conv.weight": mask}, GLOBAL, encoding)


def strategy(kind=FleetFedAvg):
    s = kind()
    s.setup_fleet(SPEC)
    s._global = {f"w:{k}": v for k, v in GLOBAL.items()}
    s.rounds[1] = {"bytes_down": 0, "bytes_up": 0, "sampled": 4, "replied": 0, "failed": 0, "refused": [],
                   "timed_out": 0, "aggregated": 0, "failures": []}
    return s


@pytest.mark.parametrize("kind", [FleetFedAvg, FleetFedProx])
def test_a_bad_update_is_refused_and_leaves_no_trace(kind):
    good = [device(1), device(2, "sparse-q8")]
    nan = device(3)
    nan["v:conv.weight"][0] = np.nan
    wrong_shape = device(4) | {"w:fc.bias": np.zeros(3, np.float32)}
    replies = [reply(2, 30, good[1]), reply(3, 50, nan), reply(0, 10, good[0]), reply(4, 20, wrong_shape)]
    s = strategy(kind)
    arrays, metrics = s.aggregate_train(1, replies)
    info = s.rounds[1]
    assert [r["partition"] for r in info["refused"]] == [3, 4]
    assert "nan" in info["refused"][0]["reason"] and "(3,)" in info["refused"][1]["reason"]
    assert info["aggregated"] == 2 and info["timed_out"] == 0 and metrics["num-examples"] == 40
    expected = masked_average(GLOBAL, [decode_update(good[0], SPEC, GLOBAL), decode_update(good[1], SPEC, GLOBAL)],
                              [10, 30])
    got = from_record(arrays)
    for name in SPEC.weights:
        assert np.array_equal(got[f"w:{name}"], expected[name])


def test_arrival_order_does_not_change_the_model():
    updates = [device(s) for s in range(4)]
    a, _ = strategy().aggregate_train(1, [reply(k, 10 + k, u) for k, u in enumerate(updates)])
    b, _ = strategy().aggregate_train(1, [reply(k, 10 + k, u) for k, u in reversed(list(enumerate(updates)))])
    for key in a:
        assert np.array_equal(a[key].numpy(), b[key].numpy())


def test_error_replies_and_missing_records_are_counted_not_aggregated():
    as_flower_task()
    sent = Message(content=RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    failed = Message(Error(code=0, reason="Traceback ...\nRuntimeError: the device dropped out"), reply_to=sent)
    no_arrays = Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 5, "partition-id": 7})}),
                        dst_node_id=1, message_type=MessageType.TRAIN)
    bad_count = reply(8, -1, device(8))
    s = strategy()
    arrays, metrics = s.aggregate_train(1, [failed, no_arrays, bad_count])
    assert arrays is None and metrics is None  # nothing acceptable: the global model stays as it was
    info = s.rounds[1]
    assert info["failed"] == 1 and info["failures"] == ["RuntimeError: the device dropped out"]
    assert [r["partition"] for r in info["refused"]] == [7, 8]
    assert info["timed_out"] == 1  # 4 sampled, 3 replied


def test_build_strategy_waits_for_every_device_and_sends_fedprox_mu():
    s = build_strategy("fedprox", SPEC, clients=10, fraction=0.5, mu=0.1)
    assert isinstance(s, FleetFedProx) and s.proximal_mu == 0.1
    assert s.min_available_nodes == 10 and s.min_train_nodes == 5 and s.fraction_evaluate == 0.0
    assert isinstance(build_strategy("fedavg", SPEC, clients=3, fraction=1.0, mu=0.1), FleetFedAvg)
