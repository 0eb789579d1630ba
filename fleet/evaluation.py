"""Evaluating a model on every fleet task: the accuracy matrix and the field's metrics.

R[t][j] is the accuracy on the test examples of fleet task j after the last round of task t;
ACC is the accuracy over the test examples of every class the fleet has seen (all classes after
the last task); forgetting is Chaudhry et al.'s (`edgecl.runtime.metrics.forgetting`).
"""

from __future__ import annotations

import numpy as np

from edgecl.runtime.dataset import Dataset
from edgecl.runtime.metrics import backward_transfer, forgetting
from edgecl.runtime.open import open_engine
from edgecl.runtime.optim import OptimizerConfig

EVAL_BATCH = 1000


class TaskEvaluator:
    """Accuracy per fleet task of any weights of one exported model, on one test set."""

    def __init__(self, artifacts, test: Dataset, task_classes):
        self.engine = open_engine(artifacts, OptimizerConfig("sgd", lr=0.01), threads=1)
        self.test = test
        self.task_classes = [tuple(c) for c in task_classes]
        self.task_rows = [np.flatnonzero(np.isin(test.y, c)) for c in self.task_classes]

    def predictions(self, weights: dict[str, np.ndarray], buffers: dict[str, np.ndarray]) -> np.ndarray:
        self.engine.set_parameters(weights)
        if buffers:
            self.engine.set_buffers(buffers)
        return self.engine.evaluate(self.test.x, EVAL_BATCH).argmax(axis=1)

    def task_accuracies(self, weights, buffers) -> list[float]:
        """Accuracy on each fleet task's test examples (class-incremental: over all the head's classes)."""
        hits = self.predictions(weights, buffers) == self.test.y
        return [float(hits[rows].mean()) if len(rows) else 0.0 for rows in self.task_rows]

    def seen_accuracy(self, accuracies: list[float], task: int) -> float:
        """Accuracy over the test examples of tasks 0..task (example-weighted)."""
        sizes = [len(r) for r in self.task_rows[: task + 1]]
        return float(np.dot(accuracies[: task + 1], sizes) / max(sum(sizes), 1))


def summarise(matrix: list[list[float]], final_acc: float) -> dict:
    """acc, acc_matrix, forgetting and BWT of a finished run (forgetting None if a row is missing)."""
    complete = len(matrix) > 0 and all(len(row) == len(matrix) for row in matrix)
    return {"acc": final_acc, "acc_matrix": matrix,
            "forgetting": forgetting(np.array(matrix)) if complete else None,
            "bwt": backward_transfer(np.array(matrix)) if complete else None}
