"""CIFAR-10 (Krizhevsky 2009) from its "python version" batches, through an unpickler that builds only
what those files contain (dicts, lists, numpy arrays): a pickle cannot run code through it.

No CIFAR-10 is reachable from this project's machines; the loader is tested on batches the tests
write (tests/runtime/test_data.py), including one whose pickle calls `posix.system`.
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import numpy as np

from .dataset import DataError, Dataset, _check_split, _existing_file, _to_unit_float


def load_cifar10(root, split: str = "train") -> Dataset:
    """CIFAR-10 (Krizhevsky 2009) from its "python version" batches, unpickled safely.

    Args:
        root: the folder holding data_batch_1..5 and test_batch (or its parent, which holds
            `cifar-10-batches-py/`). split: "train" (the five data batches, in order) or "test".

    Returns:
        Dataset "cifar10-<split>", x (N, 3, 32, 32) float32 in [0, 1] (rows are 1024 red, 1024 green,
        1024 blue bytes), 10 classes.

    Raises:
        ValueError: an unknown split. FileNotFoundError: a batch is missing.
        DataError: a batch is not a pickle, references anything but dict/list/numpy arrays, or
            lacks data (N, 3072) uint8 or N labels in [0, 9].
    """
    _check_split(split)
    root = Path(root)
    if not (root / "test_batch").exists() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        path = _existing_file(root / name)
        with path.open("rb") as f:
            try:
                batch = _SafeUnpickler(f, encoding="bytes").load()
            except DataError:
                raise
            except Exception as e:
                raise DataError(f"CIFAR-10 batch {str(path)!r} is not a readable pickle: {e!r}") from e
        data, labels = _cifar_fields(batch, path)
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return Dataset(f"cifar10-{split}", _to_unit_float(np.concatenate(xs)), np.concatenate(ys), 10)



class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that builds only dicts, lists and numpy arrays: a pickle cannot run code through it."""

    def find_class(self, module: str, name: str):
        allowed = _safe_globals()
        if (module, name) not in allowed:
            raise DataError(f"pickle references {module}.{name}, which a CIFAR-10 batch never needs; accepted: "
                            f"{', '.join(sorted(f'{m}.{n}' for m, n in allowed))}")
        return allowed[(module, name)]


@functools.lru_cache(maxsize=1)
def _safe_globals() -> dict:
    """The globals a CIFAR-10 batch pickle may name: Python 2 (numpy.core) or numpy 2 (numpy._core) paths."""
    import importlib

    core = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"
    multiarray, numeric = (importlib.import_module(f"{core}.{m}") for m in ("multiarray", "numeric"))

    def latin1_encode(text, encoding="latin1"):
        # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(text, "latin1").
        if encoding != "latin1":
            raise DataError(f"pickle calls _codecs.encode with encoding {encoding!r}; accepted: 'latin1'")
        return text.encode("latin1")

    allowed = {("builtins", "dict"): dict, ("builtins", "list"): list, ("numpy", "ndarray"): np.ndarray,
               ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): latin1_encode}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


def _cifar_fields(batch, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Check one unpickled batch and return its data (N, 3072) uint8 and labels (N,) int64."""
    if not isinstance(batch, dict):
        raise DataError(f"CIFAR-10 batch {str(path)!r} holds a {type(batch).__name__}; accepted: a dict")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"shape {data.shape} dtype {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"CIFAR-10 batch {str(path)!r}: data is {found}; accepted: (N, 3072) uint8")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"CIFAR-10 batch {str(path)!r}: labels are not integers: {e}") from e
    if labels.shape != (len(data),):
        raise DataError(f"CIFAR-10 batch {str(path)!r} holds {len(data)} images but labels of shape "
                        f"{labels.shape}; accepted: one label per image")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"CIFAR-10 batch {str(path)!r}: labels span [{labels.min()}, {labels.max()}]; accepted: 0..9")
    return data, labels
