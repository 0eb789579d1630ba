"""The data set type every loader returns, its error, and the checks the loaders share.

Its own module so that the loaders (`data.py`, `cifar.py`) import it and not each other.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .errors import EdgeclError

SPLITS = ("train", "test")


class DataError(EdgeclError, ValueError):
    """A data file is malformed: wrong magic number, truncated, inconsistent sizes or counts."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Images x float32 (N, C, H, W) and labels y int64 (N,) in [0, num_classes).

    Raises:
        ValueError: x is not 4-D float32, y is not N integers, or a label is outside [0, num_classes).
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int

    def __post_init__(self):
        if self.x.ndim != 4 or self.x.dtype != np.float32:
            raise ValueError(f"{self.name}: x has shape {self.x.shape} dtype {self.x.dtype}; "
                             f"accepted: (N, C, H, W) float32")
        if self.y.shape != (len(self.x),) or not np.issubdtype(self.y.dtype, np.integer):
            raise ValueError(f"{self.name}: y has shape {self.y.shape} dtype {self.y.dtype}; "
                             f"accepted: ({len(self.x)},) integers")
        if self.num_classes < 1:
            raise ValueError(f"{self.name}: num_classes={self.num_classes}; accepted: >= 1")
        if len(self.y) and (self.y.min() < 0 or self.y.max() >= self.num_classes):
            raise ValueError(f"{self.name}: labels span [{self.y.min()}, {self.y.max()}]; "
                             f"accepted: [0, {self.num_classes - 1}] (num_classes={self.num_classes})")


def _to_unit_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1]."""
    x = pixels.astype(np.float32)
    x /= 255.0
    return x


def _existing_file(path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data file {str(path)!r} is a folder; accepted: a file")
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    return path


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; accepted: {', '.join(map(repr, SPLITS))}")
