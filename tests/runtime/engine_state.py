"""Engines of each kind for the engine tests, a bit-exact snapshot of an engine's whole state, and
the helpers the property tests share (`live_engine`, `refuses`, value strategies)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st

from edgecl.runtime import OptimizerConfig, open_engine
from tests.helpers import batch

# The three engines; ort-training and torch are left out where their package is absent.
KINDS = ("portable", pytest.param("ort-training", marks=pytest.mark.ort_training),
         pytest.param("torch", marks=pytest.mark.torch))


def open_test_engine(exported, kind: str, family: str, optimizer: OptimizerConfig = OptimizerConfig()):
    """An engine of `kind` ("portable", "ort-training", "torch") for an exported test model."""
    if kind == "torch":
        from edgecl.exporters.reference import TorchEngine

        model, folder = exported(family, "portable")
        return TorchEngine.from_artifacts(model, folder, optimizer, threads=1)
    _, folder = exported(family, kind)
    return open_engine(folder, optimizer, threads=1)


def snapshot(engine) -> dict:
    """Everything a call could change: every array of `state_arrays()` (parameters, masks, running
    statistics, optimizer state, meta with steps_done), copied, and the learning rate."""
    arrays = {k: np.array(v, copy=True) for k, v in engine.state_arrays().items()}
    return {"arrays": arrays, "lr": getattr(engine, "learning_rate", None), "steps_done": engine.steps_done}


def assert_unchanged(before: dict, engine) -> None:
    """The engine's state is bit-identical to `before` (NaN-safe: bytes are compared)."""
    after = snapshot(engine)
    assert (after["lr"], after["steps_done"]) == (before["lr"], before["steps_done"])
    assert after["arrays"].keys() == before["arrays"].keys()
    for key, want in before["arrays"].items():
        got = after["arrays"][key]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), key
        assert got.tobytes() == want.tobytes(), f"{key} changed"


# --- for the property tests ------------------------------------------------------
SGD_MOMENTUM = OptimizerConfig("sgd", lr=0.03, momentum=0.9, weight_decay=1e-4)
ADAMW = OptimizerConfig("adamw", lr=1e-3, weight_decay=0.01)
EXAMPLES = settings(max_examples=60, deadline=None)

# Each engine on a model with BatchNorm and SGD with momentum, and on one without and AdamW.
LIVE_ENGINES = [
    pytest.param(("portable", "resnet", SGD_MOMENTUM), id="portable-resnet-sgd"),
    pytest.param(("portable", "cnn", ADAMW), id="portable-cnn-adamw"),
    pytest.param(("ort-training", "resnet", SGD_MOMENTUM), id="ort-resnet-sgd", marks=pytest.mark.ort_training),
    pytest.param(("ort-training", "cnn", ADAMW), id="ort-cnn-adamw", marks=pytest.mark.ort_training),
    pytest.param(("torch", "resnet", SGD_MOMENTUM), id="torch-resnet-sgd", marks=pytest.mark.torch),
    pytest.param(("torch", "cnn", ADAMW), id="torch-cnn-adamw", marks=pytest.mark.torch),
]


def live_engine(exported, kind: str, family: str, optimizer: OptimizerConfig):
    """An engine whose every part of the state is live: masks of zeros and ones, two steps taken."""
    engine = open_test_engine(exported, kind, family, optimizer)
    rng = np.random.default_rng(0)
    engine.set_masks({n: (rng.random(s) < 0.7).astype(np.float32) for n, s in engine.mask_shapes.items()})
    for _ in range(2):
        engine.step(*batch(rng, 8))
    return engine


def refuses(engine, call, exception, message: str) -> None:
    """`call()` raises `exception` matching `message`, and the engine is as it was."""
    before = snapshot(engine)
    with pytest.raises(exception, match=message):
        call()
    assert_unchanged(before, engine)


def index_in(draw, shape: tuple) -> tuple[int, ...]:
    return tuple(draw(st.integers(0, d - 1)) for d in shape)


def f32(v: float) -> float:
    """The float32 nearest to v (hypothesis wants float32 bounds exact)."""
    return float(np.float32(v))


def esc(value) -> str:
    return re.escape(str(value))


NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
