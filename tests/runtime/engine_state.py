"""Engines of each kind for the engine tests, and a bit-exact snapshot of an engine's whole state."""

from __future__ import annotations

import numpy as np
import pytest

from edgecl.runtime import OptimizerConfig, open_engine

# The three engines; ort-training and torch are left out where their package is absent.
KINDS = ("portable", pytest.param("ort-training", marks=pytest.mark.ort_training), pytest.param("torch", marks=pytest.mark.torch))


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
