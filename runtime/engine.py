"""The engine interface every training backend offers, and the checks shared by all.

An engine holds the model's parameters, masks, BatchNorm running statistics and
optimizer state, and turns batches into losses, gradients and optimizer steps. The
loss of every engine is the same formula (DER++ needs both terms):

    loss = sum_i w_i * CE(z_i, y_i) + sum_i v_i * mean_k (z_ik - t_ik)^2

with `sample_weight` w (default 1/N), `logit_weight` v (default 0) and
`target_logits` t (default 0); z are the logits of the batch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import ArtifactError, BatchError
from .manifest import Manifest
from .optim import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class Batch:
    """A checked training batch: x float32 (N, *input_shape), y int64 (N,), weights float32 (N,)."""

    x: np.ndarray
    y: np.ndarray
    sample_weight: np.ndarray
    target_logits: np.ndarray
    logit_weight: np.ndarray


def _check_finite(name: str, a: np.ndarray) -> None:
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0]
        raise BatchError(f"{name} holds a non-finite value {float(a[tuple(bad)])} at index {tuple(int(i) for i in bad)}; accepted: finite values only")


def _check_float(name: str, a, shape: tuple) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise BatchError(f"{name} is a {type(a).__name__}; accepted: a numpy float32 array of shape {shape}")
    if a.dtype != np.float32:
        raise BatchError(f"{name}.dtype is {a.dtype}; accepted: float32 (convert with .astype(np.float32))")
    if a.shape != shape:
        raise BatchError(f"{name}.shape is {a.shape}; accepted: {shape}")
    _check_finite(name, a)
    return np.ascontiguousarray(a)


def check_batch(manifest: Manifest, x, y, sample_weight=None, target_logits=None, logit_weight=None) -> Batch:
    """Validate a batch against the manifest and fill the defaults of the loss terms.

    Raises:
        BatchError: naming the bad argument, its value and what is accepted.
    """
    if not isinstance(x, np.ndarray) or x.ndim != 1 + len(manifest.input_shape) or x.shape[0] < 1:
        got = x.shape if isinstance(x, np.ndarray) else type(x).__name__
        raise BatchError(f"x has shape {got}; accepted: (N, {', '.join(map(str, manifest.input_shape))}) with N >= 1")
    n = x.shape[0]
    x = _check_float("x", x, (n, *manifest.input_shape))
    if not isinstance(y, np.ndarray) or not np.issubdtype(y.dtype, np.integer):
        got = y.dtype if isinstance(y, np.ndarray) else type(y).__name__
        raise BatchError(f"y has dtype {got}; accepted: an integer numpy array of shape ({n},)")
    if y.shape != (n,):
        raise BatchError(f"y.shape is {y.shape}; accepted: ({n},), one label per row of x")
    k = manifest.num_classes
    out_of_range = (y < 0) | (y >= k)
    if out_of_range.any():
        i = int(np.argmax(out_of_range))
        raise BatchError(f"y[{i}] = {int(y[i])} is out of range; accepted: labels in [0, {k - 1}]")
    y = y.astype(np.int64)
    sw = np.full(n, 1.0 / n, np.float32) if sample_weight is None else _check_float("sample_weight", sample_weight, (n,))
    tl = np.zeros((n, k), np.float32) if target_logits is None else _check_float("target_logits", target_logits, (n, k))
    lw = np.zeros(n, np.float32) if logit_weight is None else _check_float("logit_weight", logit_weight, (n,))
    return Batch(x, y, sw, tl, lw)


def check_input(manifest: Manifest, x) -> np.ndarray:
    """Validate an evaluation input x (N, *input_shape) float32, finite."""
    if not isinstance(x, np.ndarray) or x.ndim != 1 + len(manifest.input_shape):
        got = x.shape if isinstance(x, np.ndarray) else type(x).__name__
        raise BatchError(f"x has shape {got}; accepted: (N, {', '.join(map(str, manifest.input_shape))})")
    return _check_float("x", x, (x.shape[0], *manifest.input_shape))


def check_named(kind: str, values: dict, specs: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Validate a name -> float32 array mapping against expected shapes (a subset is allowed).

    float32 arrays are returned as given, not copied: engines copy what they keep.
    """
    out = {}
    for name, val in values.items():
        if name not in specs:
            raise KeyError(f"{kind} {name!r} is unknown; accepted: {', '.join(specs) or 'none'}")
        val = np.asarray(val)
        if val.shape != specs[name]:
            raise ValueError(f"{kind} {name!r} has shape {val.shape}; accepted: {specs[name]}")
        if not np.isfinite(val).all():
            raise ValueError(f"{kind} {name!r} holds non-finite values; accepted: finite values only")
        out[name] = val.astype(np.float32, copy=False)
    return out


def check_masks(values: dict, specs: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Validate masks: known masked parameter, right shape, only 0 and 1."""
    masks = check_named("mask", values, specs)
    for name, m in masks.items():
        if not np.isin(m, (0.0, 1.0)).all():
            raise ValueError(f"mask {name!r} holds values other than 0 and 1; accepted: a 0/1 array")
    return masks


class Engine:
    """Base class: the public interface, argument checks and checkpoint files.

    Subclasses implement `_loss_and_grads`, `_apply_gradients`, `_evaluate`,
    `parameters`, `_set_parameters`, `masks`, `_set_masks`, `buffers`,
    `_state_arrays`, `_load_state_arrays` and `set_learning_rate`.
    """

    name = "base"

    def __init__(self, manifest: Manifest, optimizer: OptimizerConfig):
        self.manifest = manifest
        self.optimizer_config = optimizer
        self.param_shapes = {p.name: p.shape for p in manifest.parameters}
        self.trainable_shapes = {p.name: p.shape for p in manifest.parameters if p.trainable}
        self.mask_shapes = {p.name: p.shape for p in manifest.parameters if p.masked}
        self.steps_done = 0
        # Logits of the last training batch (before that step's update): DER++ stores them.
        self.last_logits: np.ndarray | None = None

    # --- public interface -------------------------------------------------
    def loss_and_grads(self, x, y, sample_weight=None, target_logits=None, logit_weight=None):
        """Loss and gradients of every trainable parameter for one batch.

        A training forward pass: BatchNorm running statistics are updated as in torch.

        Args:
            x: float32 (N, *input_shape). y: integer (N,) in [0, num_classes).
            sample_weight: float32 (N,), default 1/N. target_logits: float32 (N, K).
            logit_weight: float32 (N,), weight of the logit-matching term, default 0.
        Returns:
            (loss as a float, {parameter name: float32 gradient}).
        Raises:
            BatchError: bad shape, dtype, label range or a non-finite value; state untouched.
        """
        batch = check_batch(self.manifest, x, y, sample_weight, target_logits, logit_weight)
        return self._loss_and_grads(batch)

    def apply_gradients(self, grads: dict[str, np.ndarray]) -> None:
        """One optimizer step from given gradients (e.g. after DGM masked them); masks re-applied."""
        missing = set(self.trainable_shapes) - set(grads)
        if missing:
            raise KeyError(f"gradients missing for {sorted(missing)}; pass one per trainable parameter")
        grads = check_named("gradient", grads, self.trainable_shapes)
        self._apply_gradients(grads)
        self.steps_done += 1

    def step(self, x, y, sample_weight=None, target_logits=None, logit_weight=None) -> float:
        """One optimizer step on one batch; returns the loss before the step."""
        loss, grads = self.loss_and_grads(x, y, sample_weight, target_logits, logit_weight)
        self.apply_gradients(grads)
        return loss

    def evaluate(self, x, batch_size: int = 512) -> np.ndarray:
        """Logits (N, num_classes) float32 in inference mode (BatchNorm running statistics)."""
        x = check_input(self.manifest, x)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; accepted: >= 1")
        chunks = [self._evaluate(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.manifest.num_classes), np.float32)

    def set_parameters(self, values: dict[str, np.ndarray]) -> None:
        """Replace some or all parameters (masked entries are zeroed again)."""
        self._set_parameters(check_named("parameter", values, self.param_shapes))

    def set_masks(self, masks: dict[str, np.ndarray]) -> None:
        """Replace the masks of some masked parameters; weights at 0 positions become 0."""
        self._set_masks(check_masks(masks, self.mask_shapes))

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Parameters, masks, buffers, optimizer state and counters as named arrays (see `save`)."""
        arrays = self._state_arrays()
        meta = {"engine": self.name, "steps_done": self.steps_done, "optimizer": self.optimizer_config.to_dict(),
                "model_name": self.manifest.model_name}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        return arrays

    def load_state_arrays(self, arrays: dict[str, np.ndarray], source: str = "arrays") -> None:
        """Restore what `state_arrays` returned. Raises ArtifactError for another engine or model."""
        arrays = dict(arrays)
        try:
            meta = json.loads(arrays.pop("meta").tobytes().decode())
        except Exception as e:
            raise ArtifactError(f"engine state {source} has no readable meta ({type(e).__name__}: {e})") from e
        if meta.get("engine") != self.name:
            raise ArtifactError(f"engine state {source} was saved by engine {meta.get('engine')!r}; this engine is {self.name!r}")
        params = {k.split("::", 1)[1]: v for k, v in arrays.items() if k.startswith("param::")}
        if set(params) != set(self.param_shapes):
            raise ArtifactError(f"engine state {source} holds parameters of another model")
        self._load_state_arrays(arrays)
        self.steps_done = int(meta["steps_done"])

    def save(self, path: str | Path) -> Path:
        """Write parameters, masks, buffers, optimizer state and counters atomically (npz)."""
        path = Path(path)
        arrays = self.state_arrays()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def load(self, path: str | Path) -> None:
        """Restore a state written by `save` of an engine of the same kind and model.

        Raises:
            ArtifactError: missing, truncated or foreign file; the engine is left as it was.
        """
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"engine state {str(path)!r} does not exist")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:  # zipfile, OSError, ValueError: all mean a bad file
            raise ArtifactError(f"engine state {str(path)!r} is unreadable ({type(e).__name__}: {e})") from e
        self.load_state_arrays(arrays, repr(str(path)))

    # --- for subclasses ---------------------------------------------------
    def _loss_and_grads(self, batch: Batch):
        raise NotImplementedError

    def _apply_gradients(self, grads):
        raise NotImplementedError

    def _evaluate(self, x):
        raise NotImplementedError

    def parameters(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _set_parameters(self, values):
        raise NotImplementedError

    def masks(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _set_masks(self, masks):
        raise NotImplementedError

    def buffers(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def set_learning_rate(self, lr: float) -> None:
        raise NotImplementedError

    def _state_arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _load_state_arrays(self, arrays) -> None:
        raise NotImplementedError
