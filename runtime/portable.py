"""The portable engine: a standard-ONNX step graph run by any ONNX Runtime, numpy for the rest.

The device owns parameters, masks, BatchNorm running statistics and optimizer state as
numpy arrays; `step.onnx` turns (batch, state) into (loss, logits, gradients, new running
statistics) and `NumpyOptimizer` applies torch's update formulas.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .engine import Batch, Engine, StepOutputs
from .errors import ArtifactError
from .manifest import Manifest
from .optim import NumpyOptimizer, OptimizerConfig, check_learning_rate
from .session import make_session


class PortableEngine(Engine):
    """Training from `step.onnx` + `forward.onnx` with numpy optimizers.

    Args:
        artifact_dir: folder written by `export(..., engine="portable")` (already verified).
        manifest: its manifest. optimizer: optimizer configuration.
        threads: ONNX Runtime intra-op threads (None: ORT's default).
    """

    name = "portable"

    def __init__(self, artifact_dir: Path, manifest: Manifest, optimizer: OptimizerConfig = OptimizerConfig(),
                 threads: int | None = None):
        super().__init__(manifest, optimizer)
        self.artifact_dir = Path(artifact_dir)
        self._step = make_session(self.artifact_dir / "step.onnx", threads)
        self._forward = make_session(self.artifact_dir / "forward.onnx", threads)
        self._step_outputs = manifest.extra["step_outputs"]
        try:
            with np.load(self.artifact_dir / "init_state.npz", allow_pickle=False) as z:
                init = {k: z[k] for k in z.files}
        except Exception as e:
            raise ArtifactError(f"{str(self.artifact_dir / 'init_state.npz')!r} is unreadable: {e}") from e
        self._params = {p.name: init[f"param::{p.name}"].astype(np.float32) for p in manifest.parameters}
        self._masks = {n: init[f"mask::{n}"].astype(np.float32) for n in self.mask_shapes}
        self._buffers = {b.name: init[f"buffer::{b.name}"].astype(np.float32) for b in manifest.buffers}
        self._optimizer = NumpyOptimizer(optimizer)
        self._apply_masks()

    def _apply_masks(self, names=None):
        for n in names if names is not None else self._masks:
            self._params[n] *= self._masks[n]

    def _state_feed(self) -> dict[str, np.ndarray]:
        feed = {f"param::{n}": v for n, v in self._params.items()}
        feed.update({f"mask::{n}": v for n, v in self._masks.items()})
        feed.update({f"buffer::{n}": v for n, v in self._buffers.items()})
        return feed

    def _forward_backward(self, batch: Batch) -> StepOutputs:
        feed = {"x": batch.x, "y": batch.y, "sample_weight": batch.sample_weight,
                "target_logits": batch.target_logits, "logit_weight": batch.logit_weight, **self._state_feed()}
        outs = dict(zip(self._step_outputs, self._step.run(self._step_outputs, feed)))
        return StepOutputs(float(outs["loss"]), outs["logits"], {n: outs[f"grad::{n}"] for n in self.trainable_shapes},
                           {n: outs[f"buffer_out::{n}"] for n in self._buffers})

    def _commit_buffers(self, buffers):
        self._buffers.update(buffers)

    def _apply_gradients(self, grads):
        self._optimizer.step(self._params, grads)
        self._apply_masks(grads.keys() & self._masks.keys())

    def _weight(self, name):
        return self._params[name]

    def _optimizer_slots(self, name):
        slots = self._optimizer.state.get(name, {})
        return slots.get("momentum"), slots.get("exp_avg")

    def _evaluate(self, x):
        return self._forward.run(["logits"], {"x": x, **self._state_feed()})[0]

    def parameters(self):
        return {n: v.copy() for n, v in self._params.items()}

    def _set_parameters(self, values):
        for n, v in values.items():
            self._params[n] = v.copy()
        self._apply_masks(values.keys() & self._masks.keys())

    def masks(self):
        return {n: v.copy() for n, v in self._masks.items()}

    def _set_masks(self, masks):
        for n, m in masks.items():
            self._masks[n] = m.copy()
        self._apply_masks(masks.keys())

    def buffers(self):
        return {n: v.copy() for n, v in self._buffers.items()}

    @property
    def learning_rate(self) -> float:
        return self._optimizer.lr

    def _set_learning_rate(self, lr: float) -> None:
        self._optimizer.lr = lr

    def _state_arrays(self):
        out = {f"param::{n}": v.copy() for n, v in self._params.items()}
        out.update({f"mask::{n}": v.copy() for n, v in self._masks.items()})
        out.update({f"buffer::{n}": v.copy() for n, v in self._buffers.items()})
        out.update({k: v.copy() for k, v in self._optimizer.state_arrays().items()})
        out["optim_meta"] = np.array([self._optimizer.step_count, self._optimizer.lr], np.float64)
        return out

    def _optimizer_specs(self, steps):
        specs = self._optimizer.state_specs(self.trainable_shapes, steps)
        specs["optim_meta"] = ((2,), np.dtype(np.float64))
        return specs

    def _check_optimizer_state(self, arrays, steps, source):
        super()._check_optimizer_state(arrays, steps, source)
        count, lr = arrays["optim_meta"]
        if count != steps:
            raise ArtifactError(f"engine state {source}: optim_meta counts {count!r} optimizer steps; accepted: "
                                f"{steps}, meta steps_done")
        try:
            check_learning_rate(lr)
        except ValueError as e:
            raise ArtifactError(f"engine state {source}: optim_meta holds {e}") from None

    def _load_state_arrays(self, arrays, source):
        self._params = {n: arrays[f"param::{n}"].copy() for n in self.param_shapes}
        self._masks = {n: arrays[f"mask::{n}"].copy() for n in self.mask_shapes}
        self._buffers = {n: arrays[f"buffer::{n}"].copy() for n in self._buffers}
        self._optimizer.load_state_arrays({k: v for k, v in arrays.items() if k.startswith("optim::")})
        count, lr = arrays["optim_meta"]
        self._optimizer.step_count, self._optimizer.lr = int(count), float(lr)
