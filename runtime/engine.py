"""The engine interface every training backend offers, and the contract all of them keep.

An engine holds the model's parameters, masks, BatchNorm running statistics and
optimizer state, and turns batches into losses, gradients and optimizer steps. The
loss of every engine is the same formula (DER++ needs both terms):

    loss = sum_i w_i * CE(z_i, y_i) + sum_i v_i * mean_k (z_ik - t_ik)^2

with `sample_weight` w (default 1/N), `logit_weight` v (default 0) and
`target_logits` t (default 0); z are the logits of the batch.

A call that raises changes nothing: every argument is checked first (see checks.py), then
the engine computes, checks that every output is finite (loss, logits, gradients, new
BatchNorm statistics) and that the optimizer update cannot leave float32's range, and only
then commits. `step` commits the statistics and the update together. `loss_and_grads` is a
whole call of its own: it commits the statistics of a batch whose outputs are all finite, as
a training forward pass in torch does. So on the DGM path (`Learner.observe`: loss_and_grads,
mask the gradients, apply_gradients), an update that apply_gradients refuses (the gradients
are finite by then: only one that would leave float32's range, e.g. at lr 1e30) leaves that
batch's statistics committed and the weights and optimizer state as they were.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np

from .checks import (Batch, absmax, check_batch, check_input, check_masks, check_named, check_optimizer_values,
                     check_outputs, check_state_arrays, check_state_masks)
from .errors import ArtifactError
from .files import write_atomic
from .manifest import Manifest
from .optim import FLOAT32_MAX, OptimizerConfig, check_learning_rate, update_bound

# An update whose bound passes this cannot overflow float32, rounding included.
UPDATE_LIMIT = FLOAT32_MAX / 2


@dataclasses.dataclass(frozen=True)
class StepOutputs:
    """What one training forward/backward pass computed, before any of it is committed.

    grads: parameter name -> float32 gradient. buffers: buffer name -> new running statistic.
    """

    loss: float
    logits: np.ndarray
    grads: dict[str, np.ndarray]
    buffers: dict[str, np.ndarray]


class Engine:
    """Base class: the public interface, the checks before any state changes, and state files.

    Subclasses implement `_forward_backward` (computes, changes nothing), `_commit_buffers`,
    `_apply_gradients` (the optimizer step, once the checks here passed), `_weight`, `_optimizer_slots`,
    `learning_rate`, `_set_learning_rate`, `_evaluate`, `parameters`, `_set_parameters`, `masks`,
    `_set_masks`, `buffers`, `_state_arrays`, `_optimizer_specs`, `_load_state_arrays` and, if
    their optimizer state has values to check, `_check_optimizer_state`.
    """

    name = "base"

    def __init__(self, manifest: Manifest, optimizer: OptimizerConfig):
        self.manifest = manifest
        self.optimizer_config = optimizer
        self.param_shapes = {p.name: p.shape for p in manifest.parameters}
        self.trainable_shapes = {p.name: p.shape for p in manifest.parameters if p.trainable}
        self.mask_shapes = {p.name: p.shape for p in manifest.parameters if p.masked}
        self.buffer_shapes = {b.name: b.shape for b in manifest.buffers}
        self.steps_done = 0
        # Logits of the last training batch (before that step's update): DER++ stores them.
        self.last_logits: np.ndarray | None = None

    # --- public interface -------------------------------------------------
    def loss_and_grads(self, x, y, sample_weight=None, target_logits=None, logit_weight=None):
        """Loss and gradients of every trainable parameter for one batch.

        A training forward pass: BatchNorm running statistics are updated as in torch, once every
        output is known to be finite (see the module docstring).

        Args:
            x: float32 (N, *input_shape). y: integer (N,) in [0, num_classes).
            sample_weight: float32 (N,), default 1/N. target_logits: float32 (N, K).
            logit_weight: float32 (N,), weight of the logit-matching term, default 0.
        Returns:
            (loss as a float, {parameter name: float32 gradient}).
        Raises:
            BatchError: bad shape, dtype, label range or a non-finite value, or a batch whose loss,
            logits, gradients or BatchNorm statistics come out non-finite; the engine is unchanged.
        """
        out, _ = self._checked_pass(x, y, sample_weight, target_logits, logit_weight)
        self._commit(out)
        return out.loss, out.grads

    def apply_gradients(self, grads: dict[str, np.ndarray]) -> None:
        """One optimizer step from given gradients (e.g. after DGM masked them); masks re-applied.

        Args:
            grads: one float array per trainable parameter (float64 is converted if it fits float32).
        Raises:
            TypeError: not a dict. KeyError: a gradient missing or unknown. ValueError: a bad dtype,
            shape or value, or an update that could leave float32's range. The engine is unchanged.
        """
        grads = self._check_gradients(grads)
        self._check_update(grads)
        self._apply_gradients(grads)
        self.steps_done += 1

    def step(self, x, y, sample_weight=None, target_logits=None, logit_weight=None) -> float:
        """One optimizer step on one batch; returns the loss before the step.

        Raises:
            BatchError: as `loss_and_grads`. ValueError: an update that could leave float32's range.
            Either way nothing was committed: no statistics, no update.
        """
        out, g_max = self._checked_pass(x, y, sample_weight, target_logits, logit_weight)
        self._check_update(out.grads, g_max)
        self._commit(out)
        self._apply_gradients(out.grads)
        self.steps_done += 1
        return out.loss

    def evaluate(self, x, batch_size: int = 512) -> np.ndarray:
        """Logits (N, num_classes) float32 in inference mode (BatchNorm running statistics)."""
        x = check_input(self.manifest, x)
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}; accepted: an integer >= 1")
        chunks = [self._evaluate(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.manifest.num_classes), np.float32)

    def set_parameters(self, values: dict[str, np.ndarray]) -> None:
        """Replace some or all parameters (masked entries are zeroed again).

        Raises:
            TypeError / KeyError / ValueError: as `checks.check_named`; the engine is unchanged.
        """
        self._set_parameters(check_named("parameter", values, self.param_shapes))

    def set_buffers(self, values: dict[str, np.ndarray]) -> None:
        """Replace some or all BatchNorm running statistics (e.g. a federated average of them).

        Raises:
            TypeError / KeyError / ValueError: as `checks.check_named`; the engine is unchanged.
        """
        self._commit_buffers(check_named("buffer", values, self.buffer_shapes))

    def set_masks(self, masks: dict[str, np.ndarray]) -> None:
        """Replace the masks of some masked parameters; weights at 0 positions become 0.

        Raises:
            TypeError / KeyError / ValueError: as `checks.check_masks`; the engine is unchanged.
        """
        self._set_masks(check_masks(masks, self.mask_shapes))

    def set_learning_rate(self, lr: float) -> None:
        """Set the learning rate of the next steps. Raises ValueError unless 0 <= lr <= float32's maximum."""
        self._set_learning_rate(check_learning_rate(lr))

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Parameters, masks, buffers, optimizer state and counters as named arrays (see `save`)."""
        arrays = self._state_arrays()
        meta = {"engine": self.name, "steps_done": self.steps_done, "optimizer": self.optimizer_config.to_dict(),
                "model_name": self.manifest.model_name}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        return arrays

    def load_state_arrays(self, arrays: dict[str, np.ndarray], source: str = "arrays") -> None:
        """Restore what `state_arrays` returned, all of it or nothing.

        The whole state is checked before anything is replaced: its meta (engine, optimizer,
        step count), every array present and no other, dtypes, shapes, finite values, masks of
        0 and 1 with their weights 0 where the mask is, and an optimizer state that fits the
        optimizer (all of its hyper-parameters but the learning rate must match).

        Raises:
            ArtifactError: naming `source`, the array or field and what is accepted; the engine is unchanged.
        """
        if not isinstance(arrays, dict):
            raise ArtifactError(f"engine state {source} is a {type(arrays).__name__}; accepted: the dict "
                                f"state_arrays() returns")
        arrays = dict(arrays)
        steps = self._check_meta(arrays.pop("meta", None), source)
        f32 = np.dtype(np.float32)
        specs = {f"param::{n}": (s, f32) for n, s in self.param_shapes.items()}
        specs.update({f"mask::{n}": (s, f32) for n, s in self.mask_shapes.items()})
        specs.update({f"buffer::{n}": (s, f32) for n, s in self.buffer_shapes.items()})
        specs.update(self._optimizer_specs(steps))
        check_state_arrays(arrays, specs, source)
        check_state_masks({n: arrays[f"param::{n}"] for n in self.mask_shapes},
                          {n: arrays[f"mask::{n}"] for n in self.mask_shapes}, source)
        self._check_optimizer_state(arrays, steps, source)
        self._load_state_arrays(arrays, source)
        self.steps_done = steps

    def save(self, path: str | Path) -> Path:
        """Write parameters, masks, buffers, optimizer state and counters atomically (npz).

        Raises:
            TypeError: `path` is not a path. IsADirectoryError: it is a folder. FileNotFoundError /
            PermissionError: its folder is missing or not writable. Nothing is written then.
        """
        if not isinstance(path, (str, Path)):
            raise TypeError(f"path is a {type(path).__name__}; accepted: a str or pathlib.Path of a file")
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"engine state path {str(path)!r} is a folder; accepted: a file path")
        data = io.BytesIO()
        np.savez(data, **self.state_arrays())
        return write_atomic(path, data.getvalue())

    def load(self, path: str | Path) -> None:
        """Restore a state written by `save` of an engine of the same kind and model.

        Raises:
            ArtifactError: missing, truncated, foreign or altered file (see `load_state_arrays`);
            the engine is left as it was.
        """
        path = Path(path)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise ArtifactError(f"engine state {str(path)!r} {what}; accepted: a file written by Engine.save")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:  # zipfile, OSError, ValueError: all mean a bad file
            raise ArtifactError(f"engine state {str(path)!r} is unreadable ({type(e).__name__}: {e})") from e
        self.load_state_arrays(arrays, repr(str(path)))

    # --- the checks and commits around the subclasses' work ---------------
    def _checked_pass(self, x, y, sample_weight, target_logits, logit_weight) -> tuple[StepOutputs, dict]:
        """The outputs of a checked batch once they are known to be finite, and max |gradient| per parameter."""
        batch = check_batch(self.manifest, x, y, sample_weight, target_logits, logit_weight)
        out = self._forward_backward(batch)
        return out, check_outputs(batch.x, out.loss, out.logits, out.grads, out.buffers)

    def _commit(self, out: StepOutputs) -> None:
        self._commit_buffers(out.buffers)
        self.last_logits = out.logits

    def _check_gradients(self, grads) -> dict[str, np.ndarray]:
        if not isinstance(grads, dict):
            raise TypeError(f"grads is a {type(grads).__name__}; accepted: a dict parameter name -> gradient")
        missing = [n for n in self.trainable_shapes if n not in grads]
        if missing:
            raise KeyError(f"gradients missing for {missing}; pass one per trainable parameter")
        return check_named("gradient", grads, self.trainable_shapes)

    def _check_update(self, grads: dict[str, np.ndarray], g_maxes: dict[str, float] | None = None) -> None:
        """Refuse an optimizer step that could make a weight or an optimizer slot leave float32's range.

        g_maxes: max |gradient| per parameter where known. The weights are read only when the bound
        without them does not settle it (see `update_bound`): the check runs every step.
        """
        lr, c, t = self.learning_rate, self.optimizer_config, self.steps_done + 1
        for name, g in grads.items():
            momentum, exp_avg = self._optimizer_slots(name)
            g_max = g_maxes[name] if g_maxes and name in g_maxes else absmax(g)
            momentum_max = None if momentum is None else absmax(momentum)
            bound = update_bound(c, lr, t, g_max, None, momentum_max)
            if not bound <= UPDATE_LIMIT:
                w_max = absmax(self._weight(name))
                bound = update_bound(c, lr, t, g_max, w_max, momentum_max, None if exp_avg is None else absmax(exp_avg))
                if not bound <= UPDATE_LIMIT:
                    raise ValueError(
                        f"the {c.kind.value} update of {name!r} at lr={lr:.4g} could leave float32's range (|weight| "
                        f"up to {w_max:.4g}, |gradient| up to {g_max:.4g}: a bound of {bound:.4g} > "
                        f"{UPDATE_LIMIT:.4g}); the engine is unchanged; accepted: a learning rate and gradients whose "
                        f"update stays finite")

    def _check_meta(self, raw, source: str) -> int:
        """The meta of a saved state: this engine, its optimizer (lr aside); returns steps_done."""
        try:
            if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 1:
                raise ValueError(f"meta is {type(raw).__name__}, not a uint8 array")
            meta = json.loads(raw.tobytes().decode())
            if not isinstance(meta, dict):
                raise ValueError(f"meta is a JSON {type(meta).__name__}, not an object")
        except Exception as e:
            raise ArtifactError(f"engine state {source} has no readable meta ({type(e).__name__}: {e})") from e
        if meta.get("engine") != self.name:
            raise ArtifactError(f"engine state {source} was saved by engine {meta.get('engine')!r}; this engine is {self.name!r}")
        steps = meta.get("steps_done")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ArtifactError(f"engine state {source}: meta steps_done is {steps!r}; accepted: an integer >= 0")
        saved, mine = meta.get("optimizer"), self.optimizer_config.to_dict()
        if not isinstance(saved, dict):
            raise ArtifactError(f"engine state {source}: meta optimizer is {saved!r}; accepted: a dict")
        differ = [f"{k} {saved.get(k)!r} (this engine: {v!r})" for k, v in mine.items()
                  if k != "lr" and saved.get(k) != v]
        if differ:
            raise ArtifactError(f"engine state {source} was saved with optimizer {', '.join(differ)}; accepted: "
                                f"the optimizer that saved it (the learning rate may differ)")
        return steps

    # --- for subclasses ---------------------------------------------------
    def _forward_backward(self, batch: Batch) -> StepOutputs:
        raise NotImplementedError

    def _commit_buffers(self, buffers: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def _apply_gradients(self, grads):
        raise NotImplementedError

    def _weight(self, name: str) -> np.ndarray:
        """A parameter as it is now (a view is fine: only read)."""
        raise NotImplementedError

    def _optimizer_slots(self, name: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(SGD momentum buffer or None, AdamW exp_avg or None) of a trainable parameter, as they are now."""
        raise NotImplementedError

    @property
    def learning_rate(self) -> float:
        raise NotImplementedError

    def _set_learning_rate(self, lr: float) -> None:
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

    def _state_arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _optimizer_specs(self, steps: int) -> dict[str, tuple]:
        """Key -> (shape, dtype) of the optimizer arrays `_state_arrays` holds after `steps` steps."""
        raise NotImplementedError

    def _check_optimizer_state(self, arrays: dict[str, np.ndarray], steps: int, source: str) -> None:
        """Raise ArtifactError for optimizer values this optimizer could not have written."""
        check_optimizer_values(arrays, steps, source)

    def _load_state_arrays(self, arrays: dict[str, np.ndarray], source: str) -> None:
        """Swap in a state that passed every check: it must not fail half-way (ArtifactError before any change)."""
        raise NotImplementedError
