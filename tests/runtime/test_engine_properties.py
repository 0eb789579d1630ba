"""Property: every input an engine refuses raises a specific error naming the value, and changes nothing.

Hypothesis draws bad batches, named arrays, updates, learning rates and batch sizes for each
`Engine` method (saved states and paths: test_engine_state_properties.py); each example
asserts the exception type, a message naming the argument and the value, and a bit-identical
engine state afterwards (parameters, masks, running statistics, optimizer state, steps_done
and the learning rate: `engine_state.snapshot`). The engines are the portable one (also under
emulated aarch64), ort-training and the torch reference (`engine_state.LIVE_ENGINES`).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecl.runtime import BatchError, OptimizerConfig
from edgecl.runtime.engine import UPDATE_LIMIT
from edgecl.runtime.optim import FLOAT32_MAX, NumpyOptimizer, update_bound
from tests.helpers import IN_SHAPE, batch
from tests.runtime.engine_state import EXAMPLES, LIVE_ENGINES, NON_FINITE, esc, f32, index_in, live_engine, refuses

K = 10  # classes of the test models
NAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789._:- "  # KeyError's message is a repr: no quotes, backslashes
# float64 values float32 cannot hold (3.4028235e38 is float32's largest).
BEYOND_FLOAT32 = st.floats(3.5e38, 1e300).flatmap(lambda v: st.sampled_from([v, -v]))
OTHER_DTYPES = st.sampled_from([np.int8, np.int32, np.int64, np.uint8, np.bool_, np.complex64, np.complex128,
                                object, "U3"])


@pytest.fixture(scope="module", params=LIVE_ENGINES)
def engine(request, exported):
    return live_engine(exported, *request.param)


# --- batches: step, loss_and_grads, evaluate --------------------------------------
@st.composite
def bad_batches(draw, bn: bool):
    """(method, args, message): a batch with one defect."""
    n = draw(st.integers(2, 6))
    x, y = batch(np.random.default_rng(draw(st.integers(0, 2**16))), n)
    defects = ["x-dtype", "x-shape", "x-rank", "x-type", "x-non-finite", "y-dtype", "y-shape", "y-range", "weights"]
    defect = draw(st.sampled_from(defects + (["x-overflow"] if bn else [])))
    method = draw(st.sampled_from(["step", "loss_and_grads"] + (["evaluate"] if defect.startswith("x-") and
                                                                  defect != "x-overflow" else [])))
    args = [x, y]
    if defect == "x-dtype":
        dtype = draw(st.sampled_from([np.float64, np.float16, np.int32, np.uint8, np.bool_, np.complex64, object]))
        args[0] = x.astype(dtype)
        message = rf"x\.dtype is {esc(np.dtype(dtype))}; accepted: float32"
    elif defect == "x-shape":
        axis = draw(st.integers(1, len(IN_SHAPE)))
        size = draw(st.integers(1, 12).filter(lambda s: s != x.shape[axis]))
        args[0] = np.zeros(x.shape[:axis] + (size,) + x.shape[axis + 1:], np.float32)
        message = rf"x\.shape is {esc(args[0].shape)}; accepted: {esc((n, *IN_SHAPE))}"
    elif defect == "x-rank":
        empty = [x[:0]] if method != "evaluate" else []  # evaluate accepts N = 0
        args[0] = draw(st.sampled_from([x[0], x[..., None], x.reshape(n, -1)] + empty))
        message = rf"x has shape {esc(args[0].shape)}; accepted: \(N, {esc(', '.join(map(str, IN_SHAPE)))}\)"
    elif defect == "x-type":
        args[0] = draw(st.sampled_from([x.tolist(), None, 1.0, "x"]))
        message = rf"x has shape {type(args[0]).__name__}"
    elif defect == "x-non-finite":
        i, v = index_in(draw, x.shape), draw(NON_FINITE)
        x[i] = v
        message = rf"x holds a non-finite value {v} at index {esc(i)}; accepted: finite values only"
    elif defect == "x-overflow":  # finite, but BatchNorm's batch variance overflows float32
        args[0] = (np.sign(x) * 10 ** draw(st.floats(19.5, 38.5))).astype(np.float32)
        message = r"the batch gives a non-finite .* the call was refused and the engine is unchanged"
    elif defect == "y-dtype":
        dtype = draw(st.sampled_from([np.float32, np.float64, np.bool_, np.complex64, object]))
        args[1] = y.astype(dtype)
        message = rf"y has dtype {esc(np.dtype(dtype))}; accepted: an integer numpy array of shape \({n},\)"
    elif defect == "y-shape":
        args[1] = draw(st.sampled_from([y[:-1], np.concatenate([y, y[:1]]), y[:, None]]))
        message = rf"y\.shape is {esc(args[1].shape)}; accepted: \({n},\)"
    elif defect == "y-range":
        i, v = draw(st.integers(0, n - 1)), draw(st.one_of(st.integers(-(2**62), -1), st.integers(K, 2**62)))
        y[i] = v
        message = rf"y\[{i}\] = {v} is out of range; accepted: labels in \[0, {K - 1}\]"
    else:  # "weights"
        name = draw(st.sampled_from(["sample_weight", "target_logits", "logit_weight"]))
        shape = (n, K) if name == "target_logits" else (n,)
        value = np.full(shape, 0.1, np.float32)
        how = draw(st.sampled_from(["dtype", "shape", "non-finite"]))
        if how == "dtype":
            value = value.astype(np.float64)
            message = rf"{name}\.dtype is float64; accepted: float32"
        elif how == "shape":
            value = value[:-1]
            message = rf"{name}\.shape is {esc(value.shape)}; accepted: {esc(shape)}"
        else:
            i, v = index_in(draw, shape), draw(NON_FINITE)
            value[i] = v
            message = rf"{name} holds a non-finite value {v} at index {esc(i)}"
        args += [value if name == n_ else None for n_ in ("sample_weight", "target_logits", "logit_weight")]
    if method == "evaluate":
        args = args[:1]
    return method, args, message


@EXAMPLES
@given(data=st.data())
def test_bad_batches_are_refused_by_name(engine, data):
    bn = bool(engine.buffers())
    method, args, message = data.draw(bad_batches(bn))
    refuses(engine, lambda: getattr(engine, method)(*args), BatchError, message)


# --- named arrays: set_parameters, set_masks, apply_gradients --------------------
@st.composite
def bad_named_arrays(draw, engine):
    """(method, argument, exception, message): a name -> array dict with one defect."""
    method = draw(st.sampled_from(["set_parameters", "set_masks", "apply_gradients"]))
    kind, specs = {"set_parameters": ("parameter", engine.param_shapes), "set_masks": ("mask", engine.mask_shapes),
                   "apply_gradients": ("gradient", engine.trainable_shapes)}[method]
    current = {"set_parameters": engine.parameters, "set_masks": engine.masks,
               "apply_gradients": lambda: {n: np.zeros(s, np.float32) for n, s in engine.trainable_shapes.items()}}
    values = current[method]()
    if method != "apply_gradients":  # a subset is accepted
        values = {n: values[n] for n in draw(st.lists(st.sampled_from(sorted(values)), min_size=1, unique=True))}
    name = draw(st.sampled_from(sorted(values)))
    shape = specs[name]
    defects = ["unknown-name", "not-a-dict", "dtype", "shape", "non-finite", "beyond-float32"]
    defects += {"set_masks": ["not-0-or-1"], "apply_gradients": ["missing"]}.get(method, [])
    defect = draw(st.sampled_from(defects))
    label = rf"{kind} {esc(repr(name))}"
    if defect == "unknown-name":
        unknown = draw(st.text(NAME_CHARS, min_size=1, max_size=12).filter(lambda s: s not in specs))
        values[unknown] = values[name]
        return method, values, KeyError, rf"{kind} {esc(repr(unknown))} is unknown; accepted: "
    if defect == "not-a-dict":
        argument = draw(st.sampled_from([list(values.values()), tuple(values.items()), None]))
        what = "grads is a" if method == "apply_gradients" else f"{kind}s are a"
        return method, argument, TypeError, rf"{what} {type(argument).__name__}; accepted: a dict"
    if defect == "missing":
        dropped = draw(st.lists(st.sampled_from(sorted(values)), min_size=1, unique=True))
        for n in dropped:
            del values[n]
        missing = [n for n in specs if n in dropped]
        return method, values, KeyError, rf"gradients missing for {esc(missing)}"
    if defect == "dtype":
        dtype = draw(OTHER_DTYPES)
        values[name] = np.zeros(shape, dtype)
        return method, values, ValueError, rf"{label} has dtype {esc(np.dtype(dtype))}; accepted: a float32 array"
    if defect == "shape":
        wrong = draw(st.lists(st.integers(1, 4), max_size=3).map(tuple).filter(lambda s: s != shape))
        values[name] = np.zeros(wrong, np.float32)
        return method, values, ValueError, rf"{label} has shape {esc(wrong)}; accepted: {esc(shape)}"
    i = index_in(draw, shape)
    value = np.array(values[name], draw(st.sampled_from([np.float32, np.float64])) if defect != "beyond-float32"
                     else np.float64)
    if defect == "non-finite":
        v = draw(NON_FINITE)
        value[i] = v
        message = rf"{label} holds a non-finite value {v} at index {esc(i)}; accepted: finite values"
    elif defect == "beyond-float32":
        v = draw(BEYOND_FLOAT32)
        value[i] = v
        message = rf"{label} holds {esc(repr(v))} at index {esc(i)}, beyond float32's range"
    else:  # "not-0-or-1"
        v = draw(st.floats(-1e6, 1e6, width=32).filter(lambda v: v not in (0, 1)))
        value[i] = v
        message = rf"{label} holds {esc(repr(float(np.float32(v))))} at index {esc(i)}, a value other than 0 and 1"
    values[name] = value
    return method, values, ValueError, message


@EXAMPLES
@given(data=st.data())
def test_bad_named_arrays_are_refused_by_name(engine, data):
    method, argument, exception, message = data.draw(bad_named_arrays(engine))
    refuses(engine, lambda: getattr(engine, method)(argument), exception, message)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_updates_beyond_float32_are_refused(engine, data):
    """SGD at a huge learning rate, AdamW with gradients whose square overflows: refused, not inf."""
    lr = engine.optimizer_config.lr  # the fixtures never change it
    grads = {n: np.zeros(s, np.float32) for n, s in engine.trainable_shapes.items()}
    name = data.draw(st.sampled_from(sorted(grads)))
    i = index_in(data.draw, grads[name].shape)
    if engine.optimizer_config.kind.value == "sgd":
        new_lr = 10 ** data.draw(st.floats(20, 38))
        grads[name][i] = data.draw(st.sampled_from([1, -1])) * 4 * FLOAT32_MAX / new_lr  # |lr * g| > float32's max
        engine.set_learning_rate(new_lr)
    else:
        g = data.draw(st.floats(f32(2e19), FLOAT32_MAX, width=32))  # g * g overflows
        grads[name][i] = data.draw(st.sampled_from([g, -g]))
    try:
        refuses(engine, lambda: engine.apply_gradients(grads), ValueError,
                rf"update of {esc(repr(name))} at lr=.* could leave float32's range .* the engine is unchanged")
    finally:
        engine.set_learning_rate(lr)


BAD_NUMBERS = st.one_of(st.floats(max_value=-1e-30), st.sampled_from([math.nan, math.inf, -math.inf]),
                        st.floats(3.5e38, 1e308), st.sampled_from([None, "0.1", True, 1j, [0.1]]))


@EXAMPLES
@given(lr=BAD_NUMBERS)
def test_bad_learning_rates_are_refused(engine, lr):
    refuses(engine, lambda: engine.set_learning_rate(lr), ValueError, rf"lr={esc(repr(lr))}; accepted: a finite number")


@settings(max_examples=30, deadline=None)
@given(size=st.one_of(st.integers(max_value=0), st.floats(allow_nan=False), st.sampled_from([None, "8", True])))
def test_bad_evaluate_batch_sizes_are_refused(engine, size):
    x, _ = batch(np.random.default_rng(0), 4)
    refuses(engine, lambda: engine.evaluate(x, size), ValueError,
            rf"batch_size={esc(repr(size))}; accepted: an integer")


# --- the bound that refuses an update: never below what the optimizer computes ------
BETAS = st.sampled_from([(0.9, 0.999), (0.5, 0.9), (0.99, 0.9), (0.9, 0.0)])
CONFIGS = st.tuples(st.sampled_from(["sgd", "adamw"]), st.floats(0, 10), st.sampled_from([0, 0.5, 0.9]), st.booleans(),
                    st.sampled_from([0, 1e-2, 0.5]), BETAS,
                    ).map(lambda c: OptimizerConfig(kind=c[0], lr=c[1], momentum=c[2], nesterov=c[3] and c[2] > 0,
                                                    weight_decay=c[4], betas=c[5]))


@settings(max_examples=100, deadline=None)
@given(config=CONFIGS, seed=st.integers(0, 2**16), steps=st.integers(1, 20), scale=st.floats(1e-6, 1e6),
       weights=st.sampled_from([1.0, 1e30, 1e38]))
def test_update_bound_holds_for_the_numpy_optimizer(config, seed, steps, scale, weights):
    """`update_bound` (what the engines refuse an update by) is never below |w| after the step, nor below the
    new SGD momentum buffer (AdamW's moments are convex combinations of their old values and g, g^2); the
    bound without the weights, when finite, means finite new weights."""
    rng = np.random.default_rng(seed)
    params = {"w": (rng.standard_normal(20) * weights / 4).astype(np.float32)}
    optimizer = NumpyOptimizer(config)
    for t in range(1, steps + 1):
        g = (rng.standard_normal(20) * scale * rng.choice([1e-3, 1, 1e3])).astype(np.float32)
        slots = optimizer.state.get("w", {})
        momentum, exp_avg = slots.get("momentum"), slots.get("exp_avg")
        momentum_max = None if momentum is None else float(np.abs(momentum).max())
        g_max = float(np.abs(g).max())
        bound = update_bound(config, config.lr, t, g_max, float(np.abs(params["w"]).max()), momentum_max,
                             None if exp_avg is None else float(np.abs(exp_avg).max()))
        blind = update_bound(config, config.lr, t, g_max, None, momentum_max)
        assert not (math.isnan(bound) or math.isnan(blind))
        if bound > UPDATE_LIMIT and blind > UPDATE_LIMIT:
            return  # the engines refuse this step
        with np.errstate(over="raise"):  # no overflow anywhere in the step
            optimizer.step(params, {"w": g})
        reached = [params["w"]] + ([optimizer.state["w"]["momentum"]] if "momentum" in optimizer.state["w"] else [])
        reached = max(float(np.abs(a).max()) for a in reached)
        assert reached <= bound * (1 + 1e-5), (t, reached, bound)
