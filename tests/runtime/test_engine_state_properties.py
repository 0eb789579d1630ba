"""Property: a saved state with any one defect, or a bad path, is refused by name and changes nothing.

`Engine.load_state_arrays` and `Engine.load` check the whole state before anything is
replaced; `Engine.save` refuses a folder, a missing folder or a non-path before writing.
Each example asserts the exception, a message naming the array (or field) and the value, and
a bit-identical engine state afterwards, on the engines of `engine_state.LIVE_ENGINES`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecl.runtime import ArtifactError
from tests.runtime.engine_state import EXAMPLES, LIVE_ENGINES, NON_FINITE, esc, f32, index_in, live_engine, refuses


@pytest.fixture(scope="module", params=LIVE_ENGINES)
def engine(request, exported):
    return live_engine(exported, *request.param)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("states")


def _json_meta(state: dict) -> dict:
    return json.loads(state["meta"].tobytes().decode())


def _with_meta(state: dict, meta: dict) -> dict:
    return {**state, "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}


@st.composite
def altered_states(draw, engine):
    """(state, message): the engine's own state with one defect."""
    state = engine.state_arrays()
    keys = sorted(k for k in state if k != "meta")
    floats = [k for k in keys if state[k].dtype.kind == "f" and state[k].size]
    defects = ["drop", "add", "dtype", "shape", "non-finite", "mask", "weight-under-zero-mask", "meta-bytes",
               "meta-field", "not-a-dict"]
    if any(k.startswith("optim::exp_avg_sq::") for k in keys):
        defects += ["negative-exp-avg-sq"]
    if any(k == "optim::ort_checkpoint::adamw" for k in keys):
        defects += ["ort-checkpoint-bytes"]
    defect = draw(st.sampled_from(defects))
    if defect == "drop":
        key = draw(st.sampled_from(sorted(state)))
        del state[key]
        return state, "has no readable meta" if key == "meta" else rf"lacks {esc([key])}"
    if defect == "add":
        key = draw(st.sampled_from(["param::", "mask::", "buffer::", "optim::momentum::", "optim::exp_avg::", "x"])
                   ) + draw(st.text("abcdefgh.", min_size=1, max_size=8))
        if key in state:
            return {**state, "meta": state["meta"][:-1]}, "has no readable meta"  # still one defect
        state[key] = np.zeros(3, np.float32)
        return state, rf"holds {esc([key])}"
    if defect == "dtype":
        key = draw(st.sampled_from(keys))
        old = state[key].dtype
        new = draw(st.sampled_from([np.float64, np.float16, np.int32, np.int8, np.uint8, np.bool_]).filter(
            lambda d: np.dtype(d) != old))
        state[key] = state[key].astype(new)
        return state, rf"{esc(key)} has dtype {esc(np.dtype(new))}; accepted: {esc(old)}"
    if defect == "shape":
        key = draw(st.sampled_from(keys))
        a = state[key]
        state[key] = a.reshape(1, -1) if a.ndim == 1 and key.startswith("optim::ort") else np.resize(a, a.size + 1)
        if state[key].shape == a.shape:  # a 1-element array: add a dimension instead
            state[key] = a.reshape(1, *a.shape)
        return state, rf"{esc(key)} has shape {esc(state[key].shape)}; accepted: "
    if defect == "non-finite":
        key = draw(st.sampled_from(floats))
        a = state[key].copy()
        i, v = index_in(draw, a.shape), draw(NON_FINITE)
        a[i] = v
        state[key] = a
        return state, rf"{esc(key)} holds {v} at index {esc(i)}; accepted: finite values only"
    masked = sorted(engine.mask_shapes)
    if defect == "mask":
        name = draw(st.sampled_from(masked))
        m = state[f"mask::{name}"].copy()
        i, v = index_in(draw, m.shape), draw(st.floats(-1e6, 1e6, width=32).filter(lambda v: v not in (0, 1)))
        m[i] = v
        state[f"mask::{name}"] = m
        return state, rf"mask::{esc(name)} holds {esc(repr(float(np.float32(v))))} at index {esc(i)}; accepted: 0 and 1"
    if defect == "weight-under-zero-mask":
        name = draw(st.sampled_from(masked))
        w, m = state[f"param::{name}"].copy(), state[f"mask::{name}"]
        zeros = np.argwhere(m == 0)
        if len(zeros):  # a weight where the mask is 0
            i = tuple(int(j) for j in zeros[draw(st.integers(0, len(zeros) - 1))])
            w[i] = draw(st.floats(-1e3, 1e3, width=32).filter(lambda v: v != 0))
            state[f"param::{name}"] = w
            return state, rf"param::{esc(name)} holds .* at index {esc(i)}; accepted: 0 wherever the mask is 0"
        defect = "meta-bytes"
    if defect == "meta-bytes":
        cut = draw(st.integers(0, state["meta"].size - 1))
        state["meta"] = draw(st.sampled_from([state["meta"][:cut], state["meta"].astype(np.int64), np.zeros(0)]))
        return state, "has no readable meta"
    if defect == "meta-field":
        meta = _json_meta(state)
        field = draw(st.sampled_from(["engine", "steps_done", "momentum", "kind", "weight_decay"]))
        if field == "engine":
            meta["engine"] = draw(st.sampled_from(["portable", "ort-training", "torch", "tflite", None]).filter(
                lambda e: e != engine.name))
            message = rf"was saved by engine {esc(repr(meta['engine']))}; this engine is {esc(repr(engine.name))}"
        elif field == "steps_done":
            meta["steps_done"] = draw(st.sampled_from([-1, -100, "2", 2.0, True, None, [2]]))
            message = rf"meta steps_done is {esc(repr(meta['steps_done']))}; accepted: an integer >= 0"
        else:
            old = meta["optimizer"][field]
            new = {"momentum": 0.5, "kind": "sgd" if old == "adamw" else "adamw", "weight_decay": 0.123}[field]
            meta["optimizer"][field] = new
            message = rf"was saved with optimizer .*{field} {esc(repr(new))} \(this engine: {esc(repr(old))}\)"
        return _with_meta(state, meta), message
    if defect == "negative-exp-avg-sq":
        key = draw(st.sampled_from([k for k in keys if k.startswith("optim::exp_avg_sq::")]))
        a = state[key].copy()
        a[index_in(draw, a.shape)] = -draw(st.floats(f32(1e-30), f32(1e30), width=32))
        state[key] = a
        return state, rf"{esc(key)} holds .*; accepted: values >= 0"
    if defect == "ort-checkpoint-bytes":
        key = "optim::ort_checkpoint::adamw"
        state[key] = state[key][:draw(st.integers(0, 64))].copy()
        return state, rf"onnxruntime-training cannot load {esc(key)} of engine state"
    return draw(st.sampled_from([list(state.items()), None, "state.npz"])), r"engine state s is a"


@EXAMPLES
@given(data=st.data())
def test_altered_states_are_refused_by_name(engine, data):
    state, message = data.draw(altered_states(engine))
    refuses(engine, lambda: engine.load_state_arrays(state, "s"), ArtifactError, message)


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_altered_state_files_are_refused(engine, folder, data):
    state, message = data.draw(altered_states(engine))
    path = folder / "state.npz"
    if isinstance(state, dict):
        np.savez(path, **state)
        message = message.replace("engine state s", "engine state .*")
    else:  # a file cut short
        data_bytes = engine.save(path).read_bytes()
        path.write_bytes(data_bytes[:data.draw(st.integers(0, len(data_bytes) - 1))])
        message = r"is unreadable"
    refuses(engine, lambda: engine.load(path), ArtifactError, message)


@settings(max_examples=10, deadline=None)
@given(where=st.sampled_from(["folder", "missing-folder", "not-a-path"]))
def test_save_to_a_bad_path_writes_nothing(engine, folder, where):
    target = folder / "save-target"
    target.mkdir(exist_ok=True)
    path, exception = {"folder": (target, IsADirectoryError), "not-a-path": (3, TypeError),
                       "missing-folder": (target / "no" / "s.npz", FileNotFoundError)}[where]
    refuses(engine, lambda: engine.save(path), exception, esc(path) if where != "not-a-path" else "path is a int")
    assert list(target.iterdir()) == []
