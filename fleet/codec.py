"""What a device sends and the server accepts: model updates as named arrays, dense, sparse or 8-bit.

Keys (`<name>` a trainable weight or BatchNorm buffer of the manifest):

    w:<name>  float32, the whole weight                       (dense; a dense weight in "sparse")
    m:<name>  uint8, np.packbits of the device's 0/1 mask      (any encoding, a weight SparCL masks)
    v:<name>  float32, the weight's values where the mask is 1 ("sparse")
    q:<name>  int8, round((w - global) / scale) (where masked)  ("sparse-q8")
    s:<name>  float32 (1,), that scale: max |w - global| / 127  ("sparse-q8")
    b:<name>  float32, a BatchNorm running statistic          (any encoding)

A mask tells the server which entries the device trained (masked aggregation, `aggregate.py`):
the rest of that weight carries no information and is never averaged in. `decode_update` checks
every key, dtype, shape, bit count and value before it returns, so a malformed or non-finite
update is refused whole (`UpdateError`) and nothing of it reaches the global model.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from edgecl.runtime.errors import EdgeclError

ENCODINGS = ("dense", "sparse", "sparse-q8")
Q8_LEVELS = 127


class UpdateError(EdgeclError, ValueError):
    """A device's update is malformed (keys, dtypes, shapes, mask bits) or not finite: refused whole."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The shapes an update must have: trainable weights, which of them may be masked, buffers."""

    weights: dict[str, tuple[int, ...]]
    maskable: frozenset[str]
    buffers: dict[str, tuple[int, ...]]

    @classmethod
    def from_manifest(cls, manifest) -> ModelSpec:
        weights = {p.name: tuple(p.shape) for p in manifest.parameters if p.trainable}
        maskable = frozenset(p.name for p in manifest.parameters if p.trainable and p.masked)
        return cls(weights, maskable, {b.name: tuple(b.shape) for b in manifest.buffers})


@dataclasses.dataclass(frozen=True)
class Update:
    """A decoded update: full-shape float32 weights, the entries each covers (None: all), buffers."""

    weights: dict[str, np.ndarray]
    coverage: dict[str, np.ndarray | None]
    buffers: dict[str, np.ndarray]


def _quantise(delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    peak = float(np.abs(delta).max()) if delta.size else 0.0
    scale = np.float32(peak / Q8_LEVELS if peak > 0 else 1.0)
    q = np.clip(np.rint(delta / scale), -Q8_LEVELS, Q8_LEVELS).astype(np.int8)
    return q, np.array([scale], np.float32)


def encode_update(weights: dict[str, np.ndarray], buffers: dict[str, np.ndarray], masks: dict[str, np.ndarray],
                  global_weights: dict[str, np.ndarray], encoding: str) -> dict[str, np.ndarray]:
    """A device's trained model as the arrays it sends (module docstring).

    Args:
        weights: trainable weights. buffers: BatchNorm statistics. masks: the 0/1 masks of the
            weights the device trains sparsely ({} for a dense method). global_weights: the model
            the round started from (the base of "sparse-q8"'s deltas). encoding: one of ENCODINGS.
    Raises:
        ValueError: an unknown encoding.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding={encoding!r}; accepted: {', '.join(ENCODINGS)}")
    out: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        w = np.asarray(w, np.float32)
        mask = masks.get(name)
        on = None if mask is None else np.asarray(mask) != 0
        if on is not None:
            out[f"m:{name}"] = np.packbits(on.ravel())
        if encoding == "dense" or (encoding == "sparse" and on is None):
            out[f"w:{name}"] = w
        elif encoding == "sparse":
            out[f"v:{name}"] = w[on]
        else:
            delta = w - np.asarray(global_weights[name], np.float32)
            out[f"q:{name}"], out[f"s:{name}"] = _quantise(delta if on is None else delta[on])
    for name, b in buffers.items():
        out[f"b:{name}"] = np.asarray(b, np.float32)
    return out


def _array(arrays: dict, key: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
    a = arrays.get(key)
    if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != tuple(shape):
        got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else ("missing" if a is None else type(a).__name__)
        raise UpdateError(f"{key!r} is {got}; accepted: {np.dtype(dtype).name} {tuple(shape)}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        i = int(np.argmax(~np.isfinite(a.ravel())))
        raise UpdateError(f"{key!r} holds {a.ravel()[i]} at flat index {i}; accepted: finite values only")
    return a


def _mask(arrays: dict, name: str, shape: tuple[int, ...]) -> np.ndarray:
    size = int(np.prod(shape))
    bits = _array(arrays, f"m:{name}", np.uint8, ((size + 7) // 8,))
    on = np.unpackbits(bits)
    if on[size:].any():
        raise UpdateError(f"'m:{name}' sets padding bits past its {size} entries; accepted: np.packbits of the mask")
    return on[:size].astype(bool).reshape(shape)


def decode_update(arrays: dict[str, np.ndarray], spec: ModelSpec, global_weights: dict[str, np.ndarray]) -> Update:
    """Check and decode what `encode_update` wrote, whatever its encoding.

    Raises:
        UpdateError: an unknown or missing key, a wrong dtype or shape, mask padding bits set, a value
            count that is not the mask's, or a non-finite value (names the key and what is accepted).
    """
    if not isinstance(arrays, dict):
        raise UpdateError(f"the update is a {type(arrays).__name__}; accepted: a dict of named arrays")
    known = {f"{p}:{n}" for n in spec.weights for p in "wmvqs"} | {f"b:{n}" for n in spec.buffers}
    unknown = sorted(set(arrays) - known, key=str)  # a key of another type must not break the sort
    if unknown:
        raise UpdateError(f"unknown keys {unknown[:5]}; accepted: w:/m:/v:/q:/s: of the model's trainable weights "
                          "and b: of its buffers")
    weights, coverage, used = {}, {}, set()
    for name, shape in spec.weights.items():
        on = None
        if f"m:{name}" in arrays:
            if name not in spec.maskable:
                raise UpdateError(f"'m:{name}': {name!r} has no mask in this model; accepted: masks of "
                                  f"{sorted(spec.maskable) or 'none'}")
            on = _mask(arrays, name, shape)
            used.add(f"m:{name}")
        count = int(on.sum()) if on is not None else int(np.prod(shape))
        if f"w:{name}" in arrays:
            w = _array(arrays, f"w:{name}", np.float32, shape).copy()
            used.add(f"w:{name}")
        elif f"v:{name}" in arrays:
            if on is None:
                raise UpdateError(f"'v:{name}' without 'm:{name}'; accepted: values with the mask they fill")
            w = np.zeros(shape, np.float32)
            w[on] = _array(arrays, f"v:{name}", np.float32, (count,))
            used.add(f"v:{name}")
        elif f"q:{name}" in arrays:
            qshape = (count,) if on is not None else shape
            q = _array(arrays, f"q:{name}", np.int8, qshape)
            scale = _array(arrays, f"s:{name}", np.float32, (1,))
            if not scale[0] > 0:
                raise UpdateError(f"'s:{name}' is {scale[0]}; accepted: a scale > 0")
            base = np.asarray(global_weights[name], np.float32)
            w = base.copy()
            with np.errstate(over="ignore"):  # a scale that overflows float32 gives inf, refused just below
                if on is None:
                    w += q.astype(np.float32) * scale[0]
                else:
                    w[on] += q.astype(np.float32) * scale[0]
            used |= {f"q:{name}", f"s:{name}"}
        else:
            raise UpdateError(f"weight {name!r} is missing: no 'w:', 'v:' or 'q:' key for it")
        if not np.isfinite(w).all():
            raise UpdateError(f"weight {name!r} decodes to non-finite values; accepted: finite weights")
        weights[name], coverage[name] = w, on
    buffers = {}
    for name, shape in spec.buffers.items():
        buffers[name] = _array(arrays, f"b:{name}", np.float32, shape)
        used.add(f"b:{name}")
    extra = sorted(set(arrays) - used)
    if extra:
        raise UpdateError(f"keys {extra[:5]} do not fit the rest of the update (two encodings of one weight?)")
    return Update(weights, coverage, buffers)


def dense_model(weights: dict[str, np.ndarray], buffers: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A whole model as the server sends it: w:<name> and b:<name> float32 arrays."""
    return {f"w:{n}": np.asarray(w, np.float32) for n, w in weights.items()} | {
        f"b:{n}": np.asarray(b, np.float32) for n, b in buffers.items()}


def split_model(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(weights, buffers) of what `dense_model` wrote."""
    return ({k[2:]: v for k, v in arrays.items() if k.startswith("w:")},
            {k[2:]: v for k, v in arrays.items() if k.startswith("b:")})


def update_nbytes(arrays: dict[str, np.ndarray]) -> int:
    """Payload bytes of the arrays alone (Flower's `ArrayRecord.count_bytes` adds npy headers and keys)."""
    return int(sum(a.nbytes for a in arrays.values()))
