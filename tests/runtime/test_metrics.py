"""CL metrics on literal accuracy matrices and logits, with hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from edgecl.runtime.metrics import (
    average_accuracy, backward_transfer, class_il_accuracy, forgetting, forward_transfer, task_il_accuracy,
)

# R[t][i]: accuracy on task i after training task t (entries above the diagonal: before training task i)
R = np.array([
    [0.90, 0.12, 0.08],
    [0.60, 0.80, 0.15],
    [0.50, 0.70, 0.85],
])


def test_average_accuracy():
    assert average_accuracy(R) == pytest.approx((0.50 + 0.70 + 0.85) / 3)  # 0.683333...
    assert average_accuracy([[42.0]]) == 42.0  # percent in, percent out


def test_backward_transfer():
    # ((0.50 - 0.90) + (0.70 - 0.80)) / 2 = (-0.40 - 0.10) / 2
    assert backward_transfer(R) == pytest.approx(-0.25)
    assert backward_transfer([[0.7]]) == 0.0


def test_forgetting_is_max_based():
    # task 0: max(0.90, 0.60) - 0.50 = 0.40; task 1: max(0.12, 0.80) - 0.70 = 0.10 -> mean 0.25
    assert forgetting(R) == pytest.approx(0.25)
    # the max differs from the diagonal when a task improves after it was trained
    r = np.array([[0.5, 0.0, 0.0], [0.9, 0.8, 0.0], [0.6, 0.8, 0.7]])
    assert forgetting(r) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.8)) / 2)
    assert backward_transfer(r) == pytest.approx(((0.6 - 0.5) + (0.8 - 0.8)) / 2)
    # negative when a task ends above every earlier accuracy on it
    assert forgetting([[0.5, 0.0], [0.7, 0.9]]) == pytest.approx(-0.2)
    assert forgetting([[0.7]]) == 0.0


def test_forward_transfer():
    b = np.array([0.10, 0.10, 0.05])
    # ((R[0,1] - b1) + (R[1,2] - b2)) / 2 = ((0.12 - 0.10) + (0.15 - 0.05)) / 2
    assert forward_transfer(R, b) == pytest.approx(0.06)
    assert forward_transfer([[0.5]], [0.1]) == 0.0
    with pytest.raises(ValueError, match=r"baseline has shape \(2,\).*accepted: 3"):
        forward_transfer(R, b[:2])
    with pytest.raises(ValueError, match="baseline"):
        forward_transfer(R, [0.1, np.nan, 0.1])


@pytest.mark.parametrize("fn", [average_accuracy, backward_transfer, forgetting])
def test_bad_matrices_raise(fn):
    with pytest.raises(ValueError, match=r"shape \(2, 3\).*square"):
        fn(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"shape \(0, 0\)"):
        fn(np.zeros((0, 0)))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        fn(np.zeros(3))
    bad = R.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"nan at R\[1\]\[2\]"):
        fn(bad)


LOGITS = np.array([
    [2.0, 1.0, 0.5, 3.0],   # class-IL predicts 3; within task {0, 1} predicts 0
    [0.1, 0.9, 0.2, 0.0],   # predicts 1 either way
    [0.0, 0.0, 5.0, 1.0],   # predicts 2; within {2, 3} predicts 2
    [4.0, 0.0, 1.0, 2.0],   # predicts 0; within {2, 3} predicts 3
])
Y = np.array([0, 1, 2, 3])


def test_class_il_accuracy():
    assert class_il_accuracy(LOGITS, Y) == pytest.approx(2 / 4)  # rows 1 and 2
    assert class_il_accuracy(np.array([[1.0, 1.0]]), np.array([0])) == 1.0  # ties: lower class


def test_task_il_accuracy_per_example_and_per_task():
    allowed = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], bool)
    assert task_il_accuracy(LOGITS, Y, allowed) == 1.0
    assert task_il_accuracy(LOGITS[:2], Y[:2], np.array([0, 1])) == 1.0
    assert task_il_accuracy(LOGITS[2:], Y[2:], np.array([2, 3])) == 1.0
    assert class_il_accuracy(LOGITS[2:], Y[2:]) == 0.5


def test_logit_errors():
    with pytest.raises(ValueError, match="NaN"):
        class_il_accuracy(np.array([[np.nan, 1.0]]), np.array([0]))
    with pytest.raises(ValueError, match=r"y\[1\] = 4; accepted: labels in \[0, 3\]"):
        class_il_accuracy(LOGITS[:2], np.array([0, 4]))
    with pytest.raises(ValueError, match=r"logits has shape \(0, 4\)"):
        class_il_accuracy(np.zeros((0, 4)), np.zeros(0, int))
    with pytest.raises(ValueError, match=r"y has shape \(3,\)"):
        class_il_accuracy(LOGITS, Y[:3])
    with pytest.raises(ValueError, match=r"y\[0\] = 0 is not among its task's classes"):
        task_il_accuracy(LOGITS, Y, np.array([2, 3]))
    with pytest.raises(ValueError, match="outside"):
        task_il_accuracy(LOGITS, Y, np.array([0, 7]))
    with pytest.raises(ValueError, match="task_classes has shape"):
        task_il_accuracy(LOGITS, Y, np.ones((2, 4), bool))
