"""A `np.random.Generator`'s exact state as a uint8 array, to store in an npz part of a checkpoint."""

from __future__ import annotations

import json

import numpy as np

_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


def rng_state_array(gen: np.random.Generator) -> np.ndarray:
    """The exact state of `gen`'s bit generator as JSON bytes in a uint8 array, to store in an npz.

    The stream of numbers continues exactly after `rng_from_state_array`; the SeedSequence
    (used only by `spawn`) is not part of the state.
    """
    text = json.dumps(gen.bit_generator.state, default=_json_array)
    return np.frombuffer(text.encode(), dtype=np.uint8).copy()


def rng_from_state_array(arr: np.ndarray) -> np.random.Generator:
    """The Generator whose bit-generator state `rng_state_array` stored in `arr`.

    Raises:
        ValueError: `arr` is not uint8 JSON of a state, or names an unknown bit generator.
    """
    arr = np.asarray(arr)
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ValueError(f"expected a 1-d uint8 array from rng_state_array, got {arr.dtype} of shape {arr.shape}")
    try:
        state = json.loads(arr.tobytes().decode(), object_hook=_json_unarray)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"rng state array is not JSON: {e}") from e
    kind = state.get("bit_generator") if isinstance(state, dict) else None
    if kind not in _BIT_GENERATORS:
        raise ValueError(f"rng state names bit generator {kind!r}; accepted: {', '.join(_BIT_GENERATORS)}")
    bit_generator = getattr(np.random, kind)()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


def _json_array(value):
    # MT19937 keeps its key as an array; numpy scalars may appear in other states.
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in an rng state")


def _json_unarray(obj: dict):
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    return obj
