"""Continual-learning metrics: pure numpy functions over the accuracy matrix and logits.

The accuracy matrix R is T x T: R[t, i] is the test accuracy on task i after training
on tasks 0..t (rows for i > t hold the accuracy on a task not yet trained, which FWT
needs). The metrics keep R's unit (fractions or percent).
"""

from __future__ import annotations

import numpy as np


def _check_matrix(r) -> np.ndarray:
    r = np.asarray(r, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.size == 0:
        raise ValueError(f"accuracy matrix has shape {r.shape}; accepted: a non-empty square (T, T) matrix")
    if not np.isfinite(r).all():
        t, i = np.argwhere(~np.isfinite(r))[0]
        raise ValueError(f"accuracy matrix holds {r[t, i]} at R[{t}][{i}]; accepted: finite values only")
    return r


def average_accuracy(r) -> float:
    """ACC = (1/T) sum_i R[T-1, i]: mean accuracy over all tasks after the last one.

    Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017.

    Args:
        r: (T, T) accuracy matrix.
    Returns:
        ACC in R's unit.
    Raises:
        ValueError: non-square, empty or non-finite matrix.
    """
    return float(_check_matrix(r)[-1].mean())


def backward_transfer(r) -> float:
    """BWT = 1/(T-1) sum_{i<T-1} (R[T-1, i] - R[i, i]); negative values mean forgetting.

    Lopez-Paz & Ranzato 2017. With one task there is nothing earlier to measure: 0.0.

    Raises:
        ValueError: non-square, empty or non-finite matrix.
    """
    r = _check_matrix(r)
    if len(r) == 1:
        return 0.0
    return float((r[-1, :-1] - np.diag(r)[:-1]).mean())


def forgetting(r) -> float:
    """Average forgetting: 1/(T-1) sum_{i<T-1} (max_{t<T-1} R[t, i] - R[T-1, i]).

    Chaudhry et al., "Riemannian Walk for Incremental Learning", ECCV 2018. Can be
    negative when every earlier accuracy on a task is below its final one (the
    released SparCL code also takes the last row into the max, which clips at 0).
    With one task: 0.0.

    Raises:
        ValueError: non-square, empty or non-finite matrix.
    """
    r = _check_matrix(r)
    if len(r) == 1:
        return 0.0
    return float((r[:-1, :-1].max(axis=0) - r[-1, :-1]).mean())


def forward_transfer(r, baseline) -> float:
    """FWT = 1/(T-1) sum_{i>=1} (R[i-1, i] - b_i): accuracy on a task before training on it
    minus that of a randomly initialised model.

    Lopez-Paz & Ranzato 2017. With one task: 0.0.

    Args:
        r: (T, T) accuracy matrix. baseline: (T,) b_i, accuracy of the random-init model on task i.
    Raises:
        ValueError: bad matrix, baseline of another length or non-finite.
    """
    r = _check_matrix(r)
    b = np.asarray(baseline, dtype=np.float64)
    if b.shape != (len(r),) or not np.isfinite(b).all():
        raise ValueError(f"baseline has shape {b.shape} (finite: {bool(np.isfinite(b).all())}); "
                         f"accepted: {len(r)} finite accuracies, one per task")
    if len(r) == 1:
        return 0.0
    return float((np.diag(r, k=1) - b[1:]).mean())


def _check_logits(logits, y) -> tuple[np.ndarray, np.ndarray]:
    logits, y = np.asarray(logits), np.asarray(y)
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits has shape {logits.shape}; accepted: (N, K) with N, K >= 1")
    if np.isnan(logits).any():
        raise ValueError("logits hold NaN; accepted: numbers (a model that diverged cannot be scored)")
    if y.shape != (logits.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y has shape {y.shape} and dtype {y.dtype}; accepted: integer labels ({logits.shape[0]},)")
    bad = (y < 0) | (y >= logits.shape[1])
    if bad.any():
        raise ValueError(f"y[{int(np.argmax(bad))}] = {int(y[np.argmax(bad)])}; accepted: labels in [0, {logits.shape[1] - 1}]")
    return logits, y


def class_il_accuracy(logits, y) -> float:
    """Class-incremental accuracy: argmax over all classes seen so far equals the label.

    Args:
        logits: (N, K) scores. y: int (N,) labels in [0, K).
    Returns:
        fraction correct in [0, 1] (ties go to the lower class index).
    Raises:
        ValueError: bad shapes, NaN logits, labels out of range.
    """
    logits, y = _check_logits(logits, y)
    return float((logits.argmax(axis=1) == y).mean())


def task_il_accuracy(logits, y, task_classes) -> float:
    """Task-incremental accuracy: argmax over the classes of the example's task only.

    The other logits are set to -inf before the argmax, as Mammoth's and the released
    SparCL code's `mask_classes` do.

    Args:
        logits: (N, K) scores. y: int (N,) labels.
        task_classes: int (C,) class ids of the task all N examples come from, or a
            bool (N, K) matrix of the classes allowed per example.
    Returns:
        fraction correct in [0, 1].
    Raises:
        ValueError: bad shapes, NaN logits, class ids out of range, a label outside its task.
    """
    logits, y = _check_logits(logits, y)
    n, k = logits.shape
    allowed = np.asarray(task_classes)
    if allowed.dtype == np.bool_ and allowed.shape == (n, k):
        allowed = allowed.copy()
    elif allowed.ndim == 1 and allowed.size and np.issubdtype(allowed.dtype, np.integer):
        if ((allowed < 0) | (allowed >= k)).any():
            raise ValueError(f"task_classes {allowed.tolist()} hold ids outside [0, {k - 1}]")
        row = np.zeros(k, bool)
        row[allowed] = True
        allowed = np.broadcast_to(row, (n, k))
    else:
        raise ValueError(f"task_classes has shape {allowed.shape} and dtype {allowed.dtype}; "
                         f"accepted: int class ids (C,) or a bool ({n}, {k}) matrix")
    outside = ~allowed[np.arange(n), y]
    if outside.any():
        i = int(np.argmax(outside))
        raise ValueError(f"y[{i}] = {int(y[i])} is not among its task's classes; accepted: a label of the task")
    masked = np.where(allowed, logits.astype(np.float64), -np.inf)
    return float((masked.argmax(axis=1) == y).mean())
