"""The portable engine: a standard-ONNX step graph run by any ONNX Runtime, numpy for the rest.

The device owns parameters, masks, BatchNorm running statistics and optimizer state as
numpy arrays; `step.onnx` turns (batch, state) into (loss, logits, gradients, new running
statistics) and `NumpyOptimizer` applies torch's update formulas.

A channel-structured export (`structure="channel"`) adds one index input per channel set: the
active channels, set with `set_channels` at any time (all of them at first). Its compact
gradients and statistics are scattered into the full arrays here, and the optimizer steps only
the active entries (`channels`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import channels as ch
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
        plan = manifest.extra.get("channels", {"sets": {}, "gathers": {}})
        self.channel_sets: dict[str, int] = dict(plan["sets"])
        self._gathers = {n: tuple(g) for n, g in plan["gathers"].items()}
        self._channels = {s: np.arange(size, dtype=np.int64) for s, size in self.channel_sets.items()}
        self._compact_grads: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._apply_masks()

    def loss_and_grads(self, x, y, sample_weight=None, target_logits=None, logit_weight=None):
        out = super().loss_and_grads(x, y, sample_weight, target_logits, logit_weight)
        # the caller holds these gradients and may change them in place before apply_gradients
        self._compact_grads = {}
        return out

    loss_and_grads.__doc__ = Engine.loss_and_grads.__doc__

    def set_channels(self, channels: dict[str, np.ndarray]) -> None:
        """Make these output channels the active ones of some channel sets (the others keep theirs).

        Steps then compute on the active channels only; an inactive channel's weights, BatchNorm
        statistics and optimizer state stay as they are until it is active again.

        Args:
            channels: set name (manifest extra["channels"]["sets"]) -> int64 indices.
        Raises:
            TypeError / KeyError / ValueError: as `channels.check_channels`; the engine is unchanged.
        """
        self._channels.update(ch.check_channels(channels, self.channel_sets))

    def channels(self) -> dict[str, np.ndarray]:
        """The active channels of every channel set (empty for an export without channel structure)."""
        return {s: v.copy() for s, v in self._channels.items()}

    def _apply_masks(self, names=None):
        for n in names if names is not None else self._masks:
            self._params[n] *= self._masks[n]

    def _state_feed(self) -> dict[str, np.ndarray]:
        feed = {f"param::{n}": v for n, v in self._params.items()}
        feed.update({f"mask::{n}": v for n, v in self._masks.items()})
        feed.update({f"buffer::{n}": v for n, v in self._buffers.items()})
        feed.update({f"channels::{s}": v for s, v in self._channels.items()})
        return feed

    def _forward_backward(self, batch: Batch) -> StepOutputs:
        feed = {"x": batch.x, "y": batch.y, "sample_weight": batch.sample_weight,
                "target_logits": batch.target_logits, "logit_weight": batch.logit_weight, **self._state_feed()}
        outs = dict(zip(self._step_outputs, self._step.run(self._step_outputs, feed)))
        g, index = self._gathers, ch.narrowing(self._channels, self.channel_sets)
        grads = {n: ch.widen(outs[f"grad::{n}"], shape, g.get(n), index) for n, shape in self.trainable_shapes.items()}
        # the optimizer steps the compact gradients; kept for gradients that come back unchanged (by identity)
        self._compact_grads = {n: (grads[n], outs[f"grad::{n}"]) for n in grads if grads[n] is not outs[f"grad::{n}"]}
        buffers = {n: ch.widen(outs[f"buffer_out::{n}"], v.shape, g.get(n), index, fill=v)
                   for n, v in self._buffers.items()}
        return StepOutputs(float(outs["loss"]), outs["logits"], grads, buffers)

    def _commit_buffers(self, buffers):
        self._buffers.update(buffers)

    def _apply_gradients(self, grads):
        if self._gathers:
            compact = {n: c for n, (full, c) in self._compact_grads.items() if grads.get(n) is full}
            self._compact_grads = {}
            ch.compact_step(self._optimizer, self._params, grads, self._gathers,
                            ch.narrowing(self._channels, self.channel_sets), compact)
        else:
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
        out.update({f"channels::{s}": v.copy() for s, v in self._channels.items()})
        return out

    def _optimizer_specs(self, steps):
        specs = self._optimizer.state_specs(self.trainable_shapes, steps)
        specs["optim_meta"] = ((2,), np.dtype(np.float64))
        # the active channels are no optimizer state, but like optim_meta they belong to this engine's state
        specs.update({f"channels::{s}": (None, np.dtype(np.int64)) for s in self.channel_sets})
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
        try:
            ch.check_channels({s: arrays[f"channels::{s}"] for s in self.channel_sets}, self.channel_sets)
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"engine state {source}: {e}") from None

    def _load_state_arrays(self, arrays, source):
        self._params = {n: arrays[f"param::{n}"].copy() for n in self.param_shapes}
        self._masks = {n: arrays[f"mask::{n}"].copy() for n in self.mask_shapes}
        self._buffers = {n: arrays[f"buffer::{n}"].copy() for n in self._buffers}
        self._optimizer.load_state_arrays({k: v for k, v in arrays.items() if k.startswith("optim::")})
        count, lr = arrays["optim_meta"]
        self._optimizer.step_count, self._optimizer.lr = int(count), float(lr)
        self._channels = {s: arrays[f"channels::{s}"].astype(np.int64) for s in self.channel_sets}
