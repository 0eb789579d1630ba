"""Averaging devices' models into the global one: FedAvg where every device counts only the
entries it trained (masked aggregation for sparse devices).

FedAvg (McMahan et al., AISTATS 2017) weights each device's model by its example count n_k. A
SparCL device trains only the entries under its mask and holds zeros elsewhere; averaging those
zeros in shrinks every weight some device masked out. So each entry is the n_k-weighted mean over
the devices whose mask covers it, and 0 where none does (every device that counted pruned it):

    w[i] = sum_k n_k c_k[i] w_k[i] / sum_k n_k c_k[i]   if sum_k n_k c_k[i] > 0, else 0

(c_k[i] = 1 where device k trained entry i; all ones for a dense device: plain FedAvg.) The global
model is then the union of the devices' sparse models: keeping the old global value where no device
trains leaves stale entries (the initial weights, even) that no device uses and the server's
evaluation does (on the README's fleet: the same ACC, 40.1 %, forgetting 61.0 % instead of 57.7 %).
If every count is 0 the global model stays as it was. BatchNorm statistics are n_k-weighted means. Sums run in
float64 in the order given, so a fixed order of devices gives the same model bit for bit.
"""

from __future__ import annotations

import numpy as np

from .codec import Update


def _weights(counts, updates: list[Update]) -> np.ndarray:
    n = np.asarray(counts, np.float64)
    if n.ndim != 1 or not np.isfinite(n).all() or (n < 0).any():
        raise ValueError(f"example counts {n.tolist()}; accepted: finite numbers >= 0, one per update")
    if len(n) != len(updates):
        raise ValueError(f"{len(n)} example counts for {len(updates)} updates; accepted: one count per update")
    return n


def masked_average(global_weights: dict[str, np.ndarray], updates: list[Update], counts) -> dict[str, np.ndarray]:
    """The new global weights (module docstring); `counts[k]` weighs `updates[k]`.

    Raises:
        ValueError: counts do not match the updates, or are negative or not finite.
    """
    n = _weights(counts, updates)
    if n.sum() <= 0:
        return {name: g.copy() for name, g in global_weights.items()}
    out = {}
    for name, g in global_weights.items():
        num = np.zeros(g.shape, np.float64)
        den = np.zeros(g.shape, np.float64)
        for nk, u in zip(n, updates):
            cover = u.coverage.get(name)
            c = nk if cover is None else nk * cover
            num += c * u.weights[name]
            den += c
        out[name] = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0).astype(np.float32)
    return out


def average_buffers(global_buffers: dict[str, np.ndarray], updates: list[Update], counts) -> dict[str, np.ndarray]:
    """n_k-weighted means of the BatchNorm statistics (the global ones if every count is 0).

    Raises:
        ValueError: counts do not match the updates, or are negative or not finite.
    """
    n = _weights(counts, updates)
    total = n.sum()
    if total <= 0:
        return {name: b.copy() for name, b in global_buffers.items()}
    return {name: (sum(nk * u.buffers[name].astype(np.float64) for nk, u in zip(n, updates)) / total).astype(np.float32)
            for name in global_buffers}


def coverage_fraction(updates: list[Update], name: str) -> float:
    """Share of a weight's entries that at least one update trained (1.0 with any dense update)."""
    covers = [u.coverage.get(name) for u in updates]
    if not covers or any(c is None for c in covers):
        return 1.0 if covers else 0.0
    return float(np.logical_or.reduce(covers).mean())
