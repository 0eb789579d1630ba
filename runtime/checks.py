"""Checks of what an engine is handed and of what a step computes, run before any state changes.

Each raises a specific error naming the argument, the offending value and what is accepted:
`BatchError` for batches (and for a batch whose loss, logits, gradients or BatchNorm
statistics come out non-finite), KeyError / ValueError / TypeError for named arrays,
`ArtifactError` for a saved engine state. Engines compute in float32, so a value is checked
after its cast to float32: a float64 1e39 is refused, not turned into inf.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .errors import ArtifactError, BatchError
from .manifest import Manifest
from .optim import FLOAT32_MAX


@dataclasses.dataclass(frozen=True)
class Batch:
    """A checked training batch: x float32 (N, *input_shape), y int64 (N,), weights float32 (N,)."""

    x: np.ndarray
    y: np.ndarray
    sample_weight: np.ndarray
    target_logits: np.ndarray
    logit_weight: np.ndarray


def first_non_finite(a: np.ndarray) -> tuple[int, ...] | None:
    """Index of the first NaN or infinity of `a`, None if there is none."""
    finite = np.isfinite(a)
    if finite.all():
        return None
    return tuple(int(i) for i in np.unravel_index(int(np.argmin(finite)), a.shape))


def absmax(a: np.ndarray) -> float:
    """max |a| without a temporary array (0 for an empty one); NaN if `a` holds a NaN."""
    return float(max(a.max(), -a.min())) if a.size else 0.0


def _bad_value(original: np.ndarray, index: tuple[int, ...]) -> str:
    value = original[index]
    if np.isfinite(value):
        return f"{value.item()!r} at index {index}, beyond float32's range (|value| <= {FLOAT32_MAX:.4g})"
    return f"a non-finite value {value.item()} at index {index}"


def _check_float32(name: str, a, shape: tuple) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise BatchError(f"{name} is a {type(a).__name__}; accepted: a numpy float32 array of shape {shape}")
    if a.dtype != np.float32:
        raise BatchError(f"{name}.dtype is {a.dtype}; accepted: float32 (convert with .astype(np.float32))")
    if a.shape != shape:
        raise BatchError(f"{name}.shape is {a.shape}; accepted: {shape}")
    bad = first_non_finite(a)
    if bad is not None:
        raise BatchError(f"{name} holds {_bad_value(a, bad)}; accepted: finite values only")
    return np.ascontiguousarray(a)


def check_batch(manifest: Manifest, x, y, sample_weight=None, target_logits=None, logit_weight=None) -> Batch:
    """Validate a batch against the manifest and fill the defaults of the loss terms.

    Raises:
        BatchError: naming the bad argument, its value and what is accepted.
    """
    if not isinstance(x, np.ndarray) or x.ndim != 1 + len(manifest.input_shape) or x.shape[0] < 1:
        got = x.shape if isinstance(x, np.ndarray) else type(x).__name__
        raise BatchError(f"x has shape {got}; accepted: (N, {', '.join(map(str, manifest.input_shape))}) with N >= 1")
    n = x.shape[0]
    x = _check_float32("x", x, (n, *manifest.input_shape))
    if not isinstance(y, np.ndarray) or not np.issubdtype(y.dtype, np.integer):
        got = y.dtype if isinstance(y, np.ndarray) else type(y).__name__
        raise BatchError(f"y has dtype {got}; accepted: an integer numpy array of shape ({n},)")
    if y.shape != (n,):
        raise BatchError(f"y.shape is {y.shape}; accepted: ({n},), one label per row of x")
    k = manifest.num_classes
    out_of_range = (y < 0) | (y >= k)
    if out_of_range.any():
        i = int(np.argmax(out_of_range))
        raise BatchError(f"y[{i}] = {int(y[i])} is out of range; accepted: labels in [0, {k - 1}]")
    y = y.astype(np.int64)
    sw = np.full(n, 1.0 / n, np.float32) if sample_weight is None else _check_float32("sample_weight", sample_weight, (n,))
    tl = np.zeros((n, k), np.float32) if target_logits is None else _check_float32("target_logits", target_logits, (n, k))
    lw = np.zeros(n, np.float32) if logit_weight is None else _check_float32("logit_weight", logit_weight, (n,))
    return Batch(x, y, sw, tl, lw)


def check_input(manifest: Manifest, x) -> np.ndarray:
    """Validate an evaluation input x (N, *input_shape) float32, finite."""
    if not isinstance(x, np.ndarray) or x.ndim != 1 + len(manifest.input_shape):
        got = x.shape if isinstance(x, np.ndarray) else type(x).__name__
        raise BatchError(f"x has shape {got}; accepted: (N, {', '.join(map(str, manifest.input_shape))})")
    return _check_float32("x", x, (x.shape[0], *manifest.input_shape))


def as_float32(label: str, value, shape: tuple) -> np.ndarray:
    """`value` as a finite float32 array of `shape`: a real floating-point array whose values fit float32.

    float32 arrays are returned as given, not copied.

    Raises:
        ValueError: not an array, another dtype (int, bool, complex, object...), another shape, or a
        value that is NaN, infinite or beyond float32's range; the message starts with `label`.
    """
    try:
        a = np.asarray(value)
    except (TypeError, ValueError) as e:  # e.g. a ragged list
        raise ValueError(f"{label} is not an array ({e}); accepted: a float32 array of shape {shape}") from None
    if a.dtype.kind != "f":
        raise ValueError(f"{label} has dtype {a.dtype}; accepted: a float32 array (float16/float64 within "
                         f"float32's range are converted)")
    if a.shape != shape:
        raise ValueError(f"{label} has shape {a.shape}; accepted: {shape}")
    with np.errstate(over="ignore"):  # an overflow becomes inf, and is refused just below
        f = a.astype(np.float32, copy=False)
    bad = first_non_finite(f)
    if bad is not None:
        raise ValueError(f"{label} holds {_bad_value(a, bad)}; accepted: finite values within float32's range")
    return f


def check_named(kind: str, values, specs: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Validate a name -> float32 array mapping against expected shapes (a subset is allowed).

    Raises:
        TypeError: `values` is not a dict. KeyError: an unknown name. ValueError: see `as_float32`.
    """
    if not isinstance(values, dict):
        raise TypeError(f"{kind}s are a {type(values).__name__}; accepted: a dict name -> array")
    out = {}
    for name, val in values.items():
        if name not in specs:
            raise KeyError(f"{kind} {name!r} is unknown; accepted: {', '.join(specs) or 'none'}")
        out[name] = as_float32(f"{kind} {name!r}", val, specs[name])
    return out


def check_masks(values, specs: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Validate masks: known masked parameter, right shape, a float array of only 0 and 1."""
    masks = check_named("mask", values, specs)
    for name, m in masks.items():
        off = (m != 0) & (m != 1)
        if off.any():
            i = tuple(int(j) for j in np.unravel_index(int(np.argmax(off)), m.shape))
            raise ValueError(f"mask {name!r} holds {m[i].item()!r} at index {i}, a value other than 0 and 1; "
                             f"accepted: a 0/1 array")
    return masks


def check_outputs(x: np.ndarray, loss: float, logits: np.ndarray, grads: dict[str, np.ndarray],
                  buffers: dict[str, np.ndarray]) -> dict[str, float]:
    """Refuse a forward/backward pass whose loss, logits, gradients or new BatchNorm statistics are not finite.

    Returns:
        max |gradient| per parameter, found on the way (the update check needs them).
    Raises:
        BatchError: naming the first non-finite output and the batch's largest |x|.
    """
    outputs = [(None, "loss", np.asarray(loss)), (None, "logits", logits)]
    outputs += [(n, f"gradient of {n!r}", g) for n, g in grads.items()]
    outputs += [(None, f"BatchNorm statistic {n!r}", b) for n, b in buffers.items()]
    g_max = {}
    for name, what, a in outputs:
        largest = absmax(a)  # NaN or inf when `a` holds one: one pass does both jobs
        if not math.isfinite(largest):
            bad = first_non_finite(a)
            raise BatchError(
                f"the batch gives a non-finite {what} ({a[bad].item()}{f' at index {bad}' if bad else ''}) with |x| "
                f"up to {absmax(x):.4g}; the call was refused and the engine is unchanged; accepted: a batch whose "
                f"loss, logits, gradients and BatchNorm statistics are finite (scale x down; if the weights "
                f"have grown huge, lower the learning rate)")
        if name is not None:
            g_max[name] = largest
    return g_max


def check_state_arrays(arrays: dict, specs: dict[str, tuple], source: str) -> None:
    """Every array of a saved engine state: present, no other, of its dtype and shape, finite.

    Args:
        specs: key -> (shape, dtype); shape None: one dimension of any length.
    Raises:
        ArtifactError: naming `source`, the key and what is accepted.
    """
    missing, unknown = sorted(set(specs) - set(arrays)), sorted(set(arrays) - set(specs))
    if missing or unknown:
        raise ArtifactError(
            f"engine state {source} is of another model or optimizer: it lacks {missing[:3] or 'nothing'} and "
            f"holds {unknown[:3] or 'nothing'} ({len(missing)} missing, {len(unknown)} unknown); accepted: a "
            f"state saved by this engine for this model with this optimizer")
    for key, (shape, dtype) in specs.items():
        a = arrays[key]
        if not isinstance(a, np.ndarray) or a.dtype != dtype:
            got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
            raise ArtifactError(f"engine state {source}: {key} has dtype {got}; accepted: {dtype}")
        if (a.ndim != 1) if shape is None else (a.shape != shape):
            raise ArtifactError(f"engine state {source}: {key} has shape {a.shape}; accepted: "
                                f"{'one dimension' if shape is None else shape}")
        bad = first_non_finite(a) if a.dtype.kind == "f" else None
        if bad is not None:
            raise ArtifactError(f"engine state {source}: {key} holds {a[bad].item()} at index {bad}; "
                                f"accepted: finite values only")


def check_state_masks(params: dict[str, np.ndarray], masks: dict[str, np.ndarray], source: str) -> None:
    """Saved masks hold only 0 and 1, and their weights are 0 wherever the mask is (the engines keep it so).

    Raises:
        ArtifactError: naming `source`, the mask or weight and the first bad index.
    """
    for name, m in masks.items():
        for what, bad in (("mask", (m != 0) & (m != 1)), ("param", (m == 0) & (params[name] != 0))):
            if bad.any():
                i = tuple(int(j) for j in np.unravel_index(int(np.argmax(bad)), m.shape))
                value = (m if what == "mask" else params[name])[i].item()
                accepted = "0 and 1 only" if what == "mask" else "0 wherever the mask is 0"
                raise ArtifactError(f"engine state {source}: {what}::{name} holds {value!r} at index {i}; "
                                    f"accepted: {accepted}")


def check_optimizer_values(arrays: dict[str, np.ndarray], steps: int, source: str) -> None:
    """Saved optimizer slots an optimizer could have written: per-tensor step counts equal to the
    engine's, AdamW's mean of squares `exp_avg_sq` never negative.

    Raises:
        ArtifactError: naming `source`, the key and what is accepted.
    """
    for key, a in arrays.items():
        if key.startswith("optim::step::") and a != steps:
            raise ArtifactError(f"engine state {source}: {key} is {a.item()!r}; accepted: {steps}, meta steps_done")
        if key.startswith("optim::exp_avg_sq::") and (a < 0).any():
            raise ArtifactError(f"engine state {source}: {key} holds {a.min().item()!r}; accepted: values >= 0 "
                                f"(a mean of squares)")
