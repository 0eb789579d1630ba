"""Every validated config refuses every bad field value with a ValueError naming the field and the value.

Property-based (hypothesis): for each config, one field at a time gets a value drawn from what that
field must refuse (out of range, NaN / inf, a bool for a number, a string, None where not allowed,
an integer past 2**64 ...), the others keep their defaults. The config must raise ValueError (not
TypeError, not an AttributeError deep inside) whose message names the field and shows the value.
Accepted inputs are covered by the modules' own tests.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecl.bench.cl_run import JobConfig
from edgecl.bench.fresh_process import MODEL_NAMES
from edgecl.bench.latency import LatencyConfig
from edgecl.bench.memory import MemoryConfig
from edgecl.devices.jobs import DataSpec, TrainSpec
from edgecl.runtime.budget import parse_bytes
from edgecl.runtime.job import LearnerSpec
from edgecl.runtime.loop import RunConfig
from edgecl.runtime.optim import OptimizerConfig
from edgecl.runtime.strategies import SparCLConfig, StrategyConfig

TEXT = st.text(max_size=8)
NOT_NUMBER = st.one_of(st.booleans(), TEXT, st.none(), st.lists(st.integers(), max_size=2))
NOT_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
HUGE_INT = st.integers(min_value=2**64, max_value=2**80)


def ints_below(low: int):
    """What an integer field with minimum `low` refuses: smaller ints, non-integral floats, non-numbers."""
    return st.one_of(st.integers(max_value=low - 1), st.floats(allow_nan=True), NOT_NUMBER)  # 2.0 is no int


def floats_outside(ok):
    """What a float field accepting `ok(v)` refuses: floats failing ok, NaN / inf, non-numbers."""
    return st.one_of(st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: not ok(v)), NOT_FINITE,
                     NOT_NUMBER)


NOT_BOOL = st.one_of(st.integers(), TEXT, st.none(), st.floats(allow_nan=False))
SEED = st.one_of(ints_below(0), HUGE_INT)
NAME = TEXT.filter(lambda s: s not in ("finetune", "joint", "er", "derpp"))

LEARNER = {
    "method": NAME,
    "sparsity": floats_outside(lambda v: 0 <= v < 1).filter(lambda v: v is not None),
    "tdm": NOT_BOOL, "dgm": NOT_BOOL, "ddr": NOT_BOOL,
    "buffer": ints_below(1).filter(lambda v: v is not None),
    "budget": st.one_of(st.sampled_from(["x", "-1", "1K", "4 MiBs", "1e3", "", "nanMiB", "0.5"]),
                        st.integers(max_value=-1), st.floats(allow_nan=True), st.booleans()),
    "epochs": ints_below(1), "batch_size": ints_below(2), "seed": SEED,
    "lr": floats_outside(lambda v: 0 < v <= 100),
    "threads": ints_below(1).filter(lambda v: v is not None), "checkpoint_every": ints_below(0),
}
CONFIGS = {
    "LearnerSpec": (LearnerSpec, {}, LEARNER),
    "JobConfig": (JobConfig, {}, {**LEARNER, "data": TEXT.filter(lambda s: s not in ("digits", "fashion-mnist")),
                                  "scenario": TEXT.filter(lambda s: s not in ("split", "permuted")),
                                  "model": TEXT.filter(lambda s: s not in MODEL_NAMES),
                                  "engine": TEXT.filter(lambda s: s not in ("portable", "ort-training", "torch")),
                                  "nudge_ulp": NOT_BOOL}),
    "TrainSpec": (TrainSpec, {"run": "r", "artifact": "a", "data": DataSpec("d")},
                  {**LEARNER, "run": st.sampled_from(["", "..", "a/b", ".hidden", "x" * 200]),
                   "artifact": st.sampled_from(["", "../a", "a b"]), "data": st.one_of(TEXT, st.integers())}),
    "DataSpec": (DataSpec, {"data": "d"}, {"data": st.sampled_from(["", "..", "a/b"]),
                                            "scenario": TEXT.filter(lambda s: s not in ("split", "permuted")),
                                            "tasks": ints_below(1), "classes_per_task": ints_below(1),
                                            "seed": SEED}),
    "RunConfig": (RunConfig, {}, {"epochs": ints_below(1), "batch_size": ints_below(2), "seed": SEED,
                                  "checkpoint_every": ints_below(0)}),
    "StrategyConfig": (StrategyConfig, {}, {"method": NAME, "replay_batch": ints_below(1),
                                            "alpha": floats_outside(lambda v: v >= 0),
                                            "beta": floats_outside(lambda v: v >= 0),
                                            "sparcl": st.one_of(TEXT, st.integers(), st.booleans())}),
    "SparCLConfig": (SparCLConfig, {}, {"sparsity": floats_outside(lambda v: 0 <= v < 1),
                                        "grad_density": floats_outside(lambda v: 0 < v <= 1),
                                        "tdm": NOT_BOOL, "dgm": NOT_BOOL, "ddr": NOT_BOOL,
                                        "dense_first_last": NOT_BOOL, "dgm_every": ints_below(1),
                                        "tdm_schedule": st.one_of(TEXT, st.integers()),
                                        "ddr_schedule": st.one_of(TEXT, st.integers())}),
    "OptimizerConfig": (OptimizerConfig, {}, {
        "kind": TEXT.filter(lambda s: s not in ("sgd", "adamw")),
        "lr": floats_outside(lambda v: 0 <= v <= 100), "momentum": floats_outside(lambda v: 0 <= v < 1),
        "dampening": floats_outside(lambda v: 0 <= v <= 1), "weight_decay": floats_outside(lambda v: v >= 0),
        "eps": floats_outside(lambda v: v > 0), "nesterov": NOT_BOOL,
        "betas": st.one_of(st.tuples(floats_outside(lambda v: 0 <= v < 1), st.just(0.9)),
                           st.lists(st.floats(0, 0.5), max_size=1), st.lists(st.floats(0, 0.5), min_size=3,
                                                                             max_size=3), TEXT, st.none())}),
}
BENCH = {
    "model": TEXT.filter(lambda s: s not in MODEL_NAMES),
    "input_shape": st.one_of(st.just((8, 8)), st.just((0, 8, 8)), st.just((1, 2, 2)), st.just(()), TEXT,
                             st.just((1.5, 8, 8)), st.integers()),
    "batch": ints_below(1), "threads": ints_below(1), "seed": SEED,
    "engines": st.one_of(st.just(()), st.just(("portable", "portable")), st.lists(NAME, min_size=1, max_size=2)),
    "target": st.one_of(st.just(""), st.integers(), st.none()),
    "runtime_python": st.sampled_from(["", "/nonexistent/python", "/"]),
    "num_classes": ints_below(2).filter(lambda v: v is not None),
}
CONFIGS["LatencyConfig"] = (LatencyConfig, {}, {**BENCH, "repeats": ints_below(1), "warmup": ints_below(0),
                                                "cold_starts": ints_below(0),
                                                "phases": st.one_of(st.just(()), st.lists(NAME, min_size=1,
                                                                                          max_size=2)),
                                                "device": st.just("serial:")})
CONFIGS["MemoryConfig"] = (MemoryConfig, {}, {**BENCH, "steps": ints_below(1), "repeats": ints_below(1),
                                              "device": st.sampled_from(["nope", "serial:", "raspberry-pi-4"])})


def shown(value, message: str) -> bool:
    """Whether `message` shows `value` (as repr or str; a float as Python prints it)."""
    forms = {repr(value), str(value)}
    if isinstance(value, (list, tuple)):
        forms.add(repr(list(value)))
    return any(form in message for form in forms)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_a_config_refuses_a_bad_field_with_a_value_error_naming_it(name, data):
    cls, base, fields = CONFIGS[name]
    field = data.draw(st.sampled_from(sorted(fields)), label="field")
    value = data.draw(fields[field], label="value")
    with pytest.raises(ValueError) as refused:
        cls(**{**base, field: value})
    message = str(refused.value)
    assert field in message, message
    assert shown(value, message), message


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=12).filter(lambda s: s.strip() and not any(
    s.strip().lower().endswith(u) for u in ("b", "kb", "mb", "gb", "tb", "kib", "mib", "gib", "tib"))
    and not s.strip().replace(".", "", 1).isdigit()))
def test_parse_bytes_refuses_what_is_not_a_size_naming_the_text(text):
    with pytest.raises(ValueError) as refused:
        parse_bytes(text)
    assert repr(text) in str(refused.value) and "accepted:" in str(refused.value)
