"""FleetConfig: refusals up front, and the round settings that rebuild each device's learner."""

from __future__ import annotations

import dataclasses

import pytest

from edgecl.fleet.config import FleetConfig, online_kwargs
from edgecl.runtime.online_config import OnlineConfig


@pytest.mark.parametrize("kwargs, named", [
    ({"rounds": 7, "tasks": 5}, "rounds=7 with tasks=5"),
    ({"data": "cifar10"}, "data='cifar10'"),
    ({"aggregation": "scaffold"}, "aggregation='scaffold'"),
    ({"encoding": "q4"}, "encoding='q4'"),
    ({"encoding": "sparse"}, "encoding='sparse'"),
    ({"encoding": "sparse-q8"}, "encoding='sparse-q8'"),
    ({"fraction": 0.0}, "fraction=0.0"),
    ({"fraction": 1.5}, "fraction=1.5"),
    ({"fraction": float("nan")}, "fraction=nan"),
    ({"alpha": 0}, "alpha=0"),
    ({"clients": 0}, "clients=0"),
    ({"rounds": 0}, "rounds=0"),
    ({"mu": -0.1}, "mu=-0.1"),
    ({"round_timeout_s": 0}, "round_timeout_s=0"),
    ({"method": "joint"}, "method='joint'"),
    ({"method": "finetune", "sparsity": 0.5}, "sparsity=0.5"),
])
def test_bad_settings_are_refused_naming_the_value(kwargs, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        FleetConfig(**kwargs)


def test_sparse_encodings_are_accepted_with_a_sparsity():
    for encoding in ("sparse", "sparse-q8"):
        assert FleetConfig(encoding=encoding, sparsity=0.75).client_settings()["encoding"] == encoding


@pytest.mark.parametrize("kwargs", [
    {},
    {"method": "er", "sparsity": 0.75, "encoding": "sparse-q8", "buffer": 64, "batch_size": 8, "replay_batch": 4,
     "lr": 0.05, "seed": 9, "data": "fashion-mnist"},
    {"method": "finetune", "data": "fashion-mnist"},
    {"aggregation": "fedprox", "rounds": 15, "tasks": 5, "epochs": 2},
])
def test_the_round_settings_rebuild_the_device_learner(kwargs):
    config = FleetConfig(**kwargs)
    settings = config.client_settings()
    assert OnlineConfig(**online_kwargs(settings)) == config.online_config()
    got, want = online_kwargs(settings), config.online_config()
    for field in ("method", "sparsity", "buffer", "batch_size", "replay_batch", "lr", "seed"):
        assert got[field] == getattr(want, field), field
    assert settings["rounds-per-task"] == config.rounds // config.tasks and settings["epochs"] == config.epochs
    assert all(isinstance(v, (int, float, str)) for v in settings.values())  # a Flower ConfigRecord's scalars


def test_learning_rate_defaults_per_data_set_and_fedprox_alone_has_a_proximal_term():
    assert FleetConfig(data="digits").learning_rate == 0.1
    assert FleetConfig(data="fashion-mnist").learning_rate == 0.03
    assert FleetConfig(lr=0.2).online_config().lr == 0.2
    assert FleetConfig(aggregation="fedavg", mu=0.5).proximal_mu == 0.0
    assert FleetConfig(aggregation="fedprox", mu=0.5).proximal_mu == 0.5


def test_dict_round_trip_and_unknown_settings():
    config = FleetConfig(clients=3, rounds=10, tasks=5, sparsity=0.5, encoding="sparse")
    assert FleetConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown fleet settings \\['clientz'\\]"):
        FleetConfig.from_dict(dataclasses.asdict(config) | {"clientz": 3})
