"""Data sets as numpy arrays (N, C, H, W) float32 in [0, 1] and int64 labels."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Images x float32 (N, C, H, W) and labels y int64 (N,)."""

    name: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int

    def __post_init__(self):
        if self.x.ndim != 4 or self.x.dtype != np.float32:
            raise ValueError(f"{self.name}: x has shape {self.x.shape} dtype {self.x.dtype}; accepted: (N, C, H, W) float32")
        if self.y.shape != (len(self.x),):
            raise ValueError(f"{self.name}: y has shape {self.y.shape}; accepted: ({len(self.x)},)")


def load_digits() -> Dataset:
    """scikit-learn's 1 797 8x8 handwritten digits (shipped inside its wheel: no download).

    Raises:
        ImportError: scikit-learn is not installed (pip install 'edgecl[data]').
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise ImportError("the digits data set needs scikit-learn: pip install 'edgecl[data]'") from e
    raw = sk_load_digits()
    x = (raw.images.astype(np.float32) / 16.0)[:, None, :, :]
    return Dataset("digits", x, raw.target.astype(np.int64), 10)


def save_npz(data: Dataset, path) -> None:
    """Write a data set as `.npz` with arrays x, y and the class count (what a board receives)."""
    np.savez(path, x=data.x, y=data.y, num_classes=np.int64(data.num_classes), name=np.array(data.name))


def load_npz(path) -> Dataset:
    """Read an `.npz` holding x (N, C, H, W) and integer y (N,); num_classes defaults to max(y) + 1.

    Raises:
        FileNotFoundError: no such file. ValueError: the file lacks x or y, or they are malformed.
    """
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise ValueError(f"data file {str(path)!r} is not a readable .npz: {e}") from e
    missing = {"x", "y"} - arrays.keys()
    if missing:
        raise ValueError(f"data file {str(path)!r} lacks arrays {sorted(missing)}; accepted: an .npz with x and y")
    x, y = arrays["x"], arrays["y"]
    if x.ndim == 3:
        x = x[:, None]
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"data file {str(path)!r}: y has dtype {y.dtype}; accepted: integers")
    k = int(arrays["num_classes"]) if "num_classes" in arrays else int(y.max()) + 1
    name = str(arrays["name"]) if "name" in arrays else path.stem
    return Dataset(name, x.astype(np.float32), y.astype(np.int64), k)
