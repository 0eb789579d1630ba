"""Channel sets on the device: checking active-channel indices, narrowing and widening arrays.

A channel-structured export (`export(..., structure="channel")`) names its channel sets and,
per parameter or buffer that follows one, a gather `[rows set, columns set, repeat]`
(manifest `extra["channels"]`). The step graph returns the gradients and BatchNorm statistics of
those tensors compact; these functions put them back into the full arrays, and run the
optimizer on the active entries only, so an inactive channel's weights and optimizer state stay
exactly as they were until it is active again.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Gather = tuple  # (rows set | None, columns set | None, repeat)


def check_channels(values, sets: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Active channels per set, checked: each a 1-D integer array, non-empty, strictly increasing
    (sorted, no duplicates), within [0, the set's size).

    Args:
        values: set name -> indices (any subset of the sets). sets: set name -> channels.
    Returns:
        set name -> int64 copy.
    Raises:
        TypeError: not a mapping, or an index array that is not of an integer dtype.
        KeyError: an unknown set name. ValueError: empty, not 1-D, out of range, unsorted or repeated.
    """
    if not isinstance(values, Mapping):
        raise TypeError(f"channels is a {type(values).__name__}; accepted: a dict of set name -> int64 indices")
    out = {}
    for name, idx in values.items():
        if name not in sets:
            raise KeyError(f"channels for {name!r}: no such channel set; accepted: {', '.join(sets)}")
        a = np.asarray(idx)
        where = f"channels[{name!r}]"
        if a.dtype.kind not in "iu":
            raise TypeError(f"{where} has dtype {a.dtype}; accepted: an integer dtype (int64)")
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"{where} has shape {a.shape}; accepted: a non-empty 1-D array of at most "
                             f"{sets[name]} channel indices")
        if a.min() < 0 or a.max() >= sets[name]:
            bad = a[(a < 0) | (a >= sets[name])][0]
            raise ValueError(f"{where} holds {bad}; accepted: indices in [0, {sets[name]})")
        steps = np.diff(a)
        if (steps <= 0).any():
            i = int(np.argmax(steps <= 0))
            what = "repeats" if steps[i] == 0 else "is unsorted at"
            raise ValueError(f"{where} {what} {a[i]}, {a[i + 1]} (positions {i}, {i + 1}); accepted: strictly "
                             "increasing indices (sorted, each channel once)")
        out[name] = a.astype(np.int64)
    return out


def narrowing(index: Mapping[str, np.ndarray], sets: Mapping[str, int]) -> dict[str, np.ndarray | None]:
    """`index` with every set that has all its channels active as None (nothing to gather): checked
    indices are strictly increasing and in range, so all of them are exactly arange(size)."""
    return {s: None if len(v) == sets[s] else v for s, v in index.items()}


def _axes(g: Gather, index: Mapping[str, np.ndarray | None]):
    rows, cols, repeat = g
    r = None if rows is None else index[rows]
    c = None if cols is None else index[cols]
    if c is not None and repeat > 1:  # a Linear after Flatten: every pixel of each active channel
        c = (c[:, None] * repeat + np.arange(repeat)[None, :]).reshape(-1)
    return r, c


def take(full: np.ndarray, g: Gather | None, index: Mapping[str, np.ndarray]) -> np.ndarray:
    """The compact part of `full` that gather `g` selects (a copy), or `full` itself when it selects all."""
    r, c = (None, None) if g is None else _axes(g, index)
    if r is None and c is None:
        return full
    if r is not None and c is not None:
        return full[r][:, c]  # 4x faster than full[np.ix_(r, c)] on (64, 1568) float32
    return full[r] if c is None else full[:, c]


def put(full: np.ndarray, compact: np.ndarray, g: Gather | None, index: Mapping[str, np.ndarray]) -> None:
    """Write `compact` back into the entries of `full` that gather `g` selects (in place)."""
    r, c = (None, None) if g is None else _axes(g, index)
    if r is None and c is None:
        if compact is not full:
            full[...] = compact
    elif r is not None and c is not None:  # through a copy of the rows: 3x faster than full[np.ix_(r, c)] = ...
        rows = full[r]
        rows[:, c] = compact
        full[r] = rows
    elif c is None:
        full[r] = compact
    else:
        full[:, c] = compact


def widen(compact: np.ndarray, shape, g: Gather | None, index: Mapping[str, np.ndarray],
          fill: np.ndarray | None = None) -> np.ndarray:
    """A full array of `shape`: `fill` (a copy) or zeros, with `compact` in the gathered entries
    (`compact` itself when `g` selects everything)."""
    r, c = (None, None) if g is None else _axes(g, index)
    if r is None and c is None:
        return compact
    full = np.zeros(shape, compact.dtype) if fill is None else fill.copy()
    put(full, compact, g, index)
    return full


def compact_step(optimizer, params: dict[str, np.ndarray], grads: dict[str, np.ndarray],
                 gathers: Mapping[str, Gather], index: Mapping[str, np.ndarray],
                 compact_grads: Mapping[str, np.ndarray] | None = None) -> None:
    """One optimizer step on the active entries of `params` only (in place).

    The parameters, gradients and optimizer slots of gathered tensors are narrowed, stepped, and
    written back: the inactive entries of weights and slots do not move (no weight decay, no
    momentum), so a channel made active again resumes from its own weights and state. A slot the
    step creates (the first step) starts at zero in the inactive entries.

    Args:
        optimizer: an `edgecl.runtime.optim.NumpyOptimizer`. grads: full-size gradients.
        compact_grads: the compact form of some of `grads` where it is at hand (the step graph's
            outputs), so they are not gathered again.
    """
    compact_grads = compact_grads or {}
    sub_params = {n: take(params[n], gathers.get(n), index) for n in grads}
    sub_grads = {n: compact_grads[n] if n in compact_grads else take(g, gathers.get(n), index)
                 for n, g in grads.items()}
    full_state = optimizer.state
    optimizer.state = {n: {s: take(v, gathers.get(n), index) if isinstance(v, np.ndarray) else v
                           for s, v in slots.items()} for n, slots in full_state.items() if n in grads}
    try:
        optimizer.step(sub_params, sub_grads)
    finally:
        stepped, optimizer.state = optimizer.state, full_state
    for n in grads:
        g = gathers.get(n)
        put(params[n], sub_params[n], g, index)
        slots = full_state.setdefault(n, {})
        for s, v in stepped.get(n, {}).items():
            if not isinstance(v, np.ndarray) or g is None:
                slots[s] = v
            else:
                if s not in slots:
                    slots[s] = np.zeros(params[n].shape, v.dtype)
                put(slots[s], v, g, index)
