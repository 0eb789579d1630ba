"""The learner an app embeds: samples in as they come, predictions at any time, one-call persistence.

    learner = open_learner("artifacts/", "state/", method="derpp", sparsity=0.75, budget="8MiB")
    learner.learn(x, y)            # 1..N samples; no tasks, epochs or indices
    labels = learner.predict(x)    # any time, from any thread
    learner.save()                 # engine, buffer, learner state, settings: atomically
    learner.export_inference("model.onnx")

Each `learn` call is cut into steps of at most `batch_size` stream samples; each step trains on
them plus replay (ER / DER++ through `Learner.observe`), then `replay_steps` replay-only steps
follow. SparCL is task-free here: the first masks at the first step, TDM updates every `tdm_every`
steps, DGM on its step schedule; DDR is not offered (`OnlineConfig`). Task boundaries are optional
(`end_task`). Threads: one lock orders training steps, predictions and saves, so a prediction sees
the model after a whole number of steps, never a half-applied update; it waits for at most the step
in progress (or a save). One process at a time holds a state folder (its lock).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from .budget import MemoryPlan, plan_memory
from .buffer import ReplayBuffer
from .buffer_log import BufferLog
from .checkpoint import CheckpointWriter, load_checkpoint
from .checks import check_named
from .errors import ArtifactError, BatchError, ConfigMismatchError
from .inference_model import export_inference
from .manifest import load_manifest
from .online_config import OnlineConfig, state_identity
from .open import open_engine
from .resume import config_differences
from .rng_state import rng_from_state_array, rng_state_array
from .strategies import Learner


def open_learner(artifact_dir: str | Path, state_dir: str | Path, *, method: str = "derpp",
                 sparsity: float | None = 0.75, structure: str = "weight", tdm: bool = True, dgm: bool = True,
                 tdm_every: int = 250, budget: str | int | None = "8MiB", buffer: int | None = None,
                 batch_size: int = 32, replay_batch: int = 32, replay_steps: int = 0, lr: float = 0.03,
                 seed: int = 0, threads: int | None = None) -> OnlineLearner:
    """Open an online learner on exported artifacts, resuming from `state_dir` if it holds a saved state.

    Args:
        artifact_dir: a folder written by `edgecl export` / `edgecl.exporters.export` on the host.
        state_dir: where `save` writes (created if missing); held by this process until `close`.
        method ... threads: as `OnlineConfig`.
    Returns:
        the learner, at its last saved state, or fresh.
    Raises:
        ValueError: a bad setting, or a budget that cannot hold the model (the plan's message).
        ConfigMismatchError: `state_dir` was written under other settings or another artifact
            (names each difference); nothing is changed.
        ArtifactError: the artifacts fail their checks, or no saved state in `state_dir` verifies.
        FolderBusyError: another process holds `state_dir`.
    """
    config = OnlineConfig(method=method, sparsity=sparsity, structure=structure, tdm=tdm, dgm=dgm,
                          tdm_every=tdm_every, budget=budget, buffer=buffer, batch_size=batch_size,
                          replay_batch=replay_batch, replay_steps=replay_steps, lr=lr, seed=seed, threads=threads)
    manifest = load_manifest(artifact_dir)
    identity = state_identity(config, artifact_dir)
    writer = CheckpointWriter(state_dir)
    try:
        return OnlineLearner(artifact_dir, writer, config, identity, manifest)
    except BaseException:
        writer.close()
        raise


class OnlineLearner:
    """One model learning from a stream inside an app; built by `open_learner`."""

    def __init__(self, artifact_dir, writer: CheckpointWriter, config: OnlineConfig, identity: dict, manifest):
        self.config, self.state_dir, self._writer, self._identity = config, writer.root, writer, identity
        self.num_classes = manifest.num_classes
        self.input_shape = tuple(manifest.input_shape)
        strategy = config.strategy()
        derpp = strategy.method.value == "derpp"
        engine = open_engine(artifact_dir, config.optimizer(), config.threads)
        self.memory_plan: MemoryPlan | None = None
        capacity = config.buffer
        if config.budget is not None:
            replay = (2 if derpp else 1) * config.replay_batch if strategy.uses_buffer else 0
            self.memory_plan = plan_memory(manifest, config.budget, config.batch_size, engine.optimizer_config,
                                           replay_batch_size=replay, store_logits=derpp, sample_shape=self.input_shape)
            room = self.memory_plan.replay_capacity
            if strategy.uses_buffer and capacity is not None and capacity > room:
                raise ValueError(f"buffer={capacity} examples does not fit the budget {config.budget}: it leaves room "
                                 f"for {room}\n{self.memory_plan.table()}")
            capacity = room if capacity is None else capacity
        self.buffer = (ReplayBuffer(capacity, self.input_shape, self.num_classes,
                                    np.random.default_rng([config.seed, 1]), store_logits=derpp)
                       if strategy.uses_buffer else None)
        self.learner = Learner(engine, strategy, self.buffer, np.random.default_rng(config.seed))
        self._log = BufferLog(self.state_dir, self.buffer) if self.buffer is not None else None
        self._lock = threading.Lock()
        self._samples_seen = 0
        self._task_samples = 0  # samples of the current task (an `end_task` with none is a no-op)
        self._app_state: dict = {}
        ckpt = load_checkpoint(self.state_dir, fallback=True, check=self._check_state)
        if ckpt is None:
            self.learner.begin_task(0, 0)
        else:
            self._restore(ckpt)

    # --- the stream -------------------------------------------------------------------
    @property
    def samples_seen(self) -> int:
        """Samples `learn` has trained on, over every run of this state folder (as of the last `save`
        when reopened): where the app's stream stands."""
        return self._samples_seen

    @property
    def task(self) -> int:
        return self.learner.task

    def learn(self, x: np.ndarray, y: np.ndarray) -> float:
        """Train on labelled samples: steps of at most `batch_size` of them, each with replay, each
        followed by `replay_steps` replay-only steps.

        Args:
            x: float32 (N, *input_shape), finite, N >= 1. y: integer (N,) labels in [0, num_classes).
        Returns:
            the mean loss of the stream steps, before their updates.
        Raises:
            BatchError: a bad shape, dtype, non-finite value or label (past the exported head: says how
                to export a larger one); raised before any step. A step whose loss or gradients come out
                non-finite is refused by the engine: the steps before it stay, `samples_seen` counts them.
        """
        x, y = self._check_stream(x, y)
        losses = []
        empty_x, empty_y = np.zeros((0, *self.input_shape), np.float32), np.zeros(0, np.int64)
        for i in range(0, len(x), self.config.batch_size):
            xb, yb = x[i : i + self.config.batch_size], y[i : i + self.config.batch_size]
            with self._lock:
                if self.learner.step == 0:
                    self.learner.initial_masks()  # SparCL's first masks; nothing for a dense strategy
                losses.append(self.learner.observe(xb, yb))
                self._samples_seen += len(xb)
                self._task_samples += len(xb)
                self._after_step()
                for _ in range(self.config.replay_steps):
                    self.learner.observe(empty_x, empty_y)
                    self._after_step()
        return float(np.mean(losses))

    def end_task(self) -> None:
        """For apps that know task boundaries: the current task is over. A TDM mask update (SparCL),
        DGM's masks restart, and the next samples are recorded under the next task id. No samples
        since the last boundary: nothing happens."""
        with self._lock:
            if self._task_samples == 0:
                return
            self.learner.end_task()
            self.learner.update_masks()
            self.learner.begin_task(self.learner.task + 1, 0)
            self._task_samples = 0

    def begin_task(self) -> None:
        """Start a new task now: `end_task` of the current one if it has samples."""
        self.end_task()

    def _after_step(self) -> None:
        s = self.config
        if s.sparsity is not None and s.tdm and self.learner.step % s.tdm_every == 0:
            self.learner.update_masks()

    # --- the weights, for a federation (edgecl.fleet) ---------------------------------------
    def parameters(self) -> dict[str, np.ndarray]:
        """Copies of the trainable weights (zero where a mask is 0)."""
        with self._lock:
            params = self.learner.engine.parameters()
        return {name: params[name] for name in self.learner.engine.trainable_shapes}

    def buffers(self) -> dict[str, np.ndarray]:
        """Copies of the BatchNorm running statistics (empty without BatchNorm)."""
        with self._lock:
            return self.learner.engine.buffers()

    def masks(self) -> dict[str, np.ndarray]:
        """SparCL's masks of the sparse weights, float32 0/1 (empty for a dense method, or before
        the first step, when the engine's exported masks are all ones)."""
        with self._lock:
            if not self.learner.masks_ready:
                return {}
            masks = self.learner.engine.masks()
            return {name: masks[name] for name in self.learner.sparse_names}

    def set_weights(self, parameters: dict[str, np.ndarray], buffers: dict[str, np.ndarray] | None = None) -> None:
        """Replace some or all trainable weights (masked entries are zeroed again) and BatchNorm
        statistics, e.g. with a federation's global model; optimizer state and buffer stay.

        Raises:
            TypeError / KeyError / ValueError: a name, shape, dtype or value the model does not take;
                nothing is changed.
        """
        engine = self.learner.engine
        parameters = check_named("parameter", parameters, engine.trainable_shapes)
        buffers = check_named("buffer", buffers or {}, engine.buffer_shapes)
        with self._lock:
            engine.set_parameters(parameters)
            if buffers:
                engine.set_buffers(buffers)

    def set_proximal(self, mu: float, anchor: dict[str, np.ndarray] | None) -> None:
        """FedProx's proximal term on the next steps: mu/2 * ||w - anchor||^2 (`Learner.set_proximal`);
        mu = 0 turns it off. Not saved: a federation sets it every round."""
        with self._lock:
            self.learner.set_proximal(mu, anchor)

    # --- predictions --------------------------------------------------------------------
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities float32 (N, num_classes), softmax of the logits in inference mode.

        Raises:
            BatchError: x is not finite float32 (N, *input_shape).
        """
        with self._lock:
            logits = self.learner.engine.evaluate(x)
        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Labels int64 (N,): the most probable class of each sample."""
        with self._lock:
            logits = self.learner.engine.evaluate(x)
        return logits.argmax(axis=1).astype(np.int64)

    def export_inference(self, path: str | Path) -> Path:
        """A self-contained ONNX inference model of the current weights, masks and BatchNorm statistics
        (`edgecl.runtime.inference_model`), with outputs `logits` and `probabilities`."""
        with self._lock:
            return export_inference(self.learner.engine, path)

    # --- persistence ----------------------------------------------------------------------
    @property
    def app_state(self) -> dict:
        """The `app_state` of the last `save` (a copy; {} before any): where the app's stream stands."""
        return json.loads(json.dumps(self._app_state))

    def save(self, app_state: dict | None = None) -> Path:
        """Write the whole state into `state_dir`, atomically: engine (weights, masks, BatchNorm
        statistics, optimizer), learner (task, step, generators, SparCL state), buffer (only the slots
        changed since the last save, `buffer_log`), `samples_seen` and the settings. A kill at any
        moment leaves the previous save or this one.

        Args:
            app_state: the app's own small JSON-able state, saved in the same atomic write (e.g. its
                position in a stream); None keeps the previous one. Read back as `app_state`.
        Returns:
            the checkpoint folder written.
        Raises:
            TypeError: app_state is not a dict that JSON can hold.
        """
        if app_state is not None:
            if not isinstance(app_state, dict):
                raise TypeError(f"app_state is a {type(app_state).__name__}; accepted: a dict that JSON can hold")
            try:
                app_state = json.loads(json.dumps(app_state, allow_nan=False))
            except (TypeError, ValueError) as e:
                raise TypeError(f"app_state cannot be saved as JSON: {e}") from None
        with self._lock:
            parts = {"engine": self.learner.engine.state_arrays(), "learner": self.learner.state_arrays()}
            kept = self._app_state if app_state is None else app_state
            meta = {"identity": self._identity, "samples_seen": self._samples_seen, "task_samples": self._task_samples,
                    "app_state": kept}
            slots = None
            if self.buffer is not None:
                slots = self.buffer.take_changed()
                parts["buffer"] = {"seen": np.array(self.buffer.seen, np.int64), "rng": rng_state_array(self.buffer.rng)}
            try:
                if slots is not None:
                    meta["log"] = self._log.append(slots)
                path = self._writer.save(parts, meta)
            except BaseException:
                if slots is not None:
                    self.buffer.changed[slots] = True  # written again by the next save
                raise
            if slots is not None:
                self._log.commit(meta["log"])
            self._app_state = kept
            return path

    def close(self) -> None:
        """Release `state_dir` (unsaved progress since the last `save` is not written)."""
        self._writer.close()

    def __enter__(self) -> OnlineLearner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_state(self, ckpt) -> None:
        """`load_checkpoint`'s check: the settings first (a mismatch is refused, never fallen back
        from), then the buffer log the checkpoint names (a fault falls back to the older one)."""
        saved = ckpt.meta.get("identity")
        if not isinstance(saved, dict):
            raise ArtifactError(f"{ckpt.path} is not an online learner's state (no identity in its meta)")
        differences = config_differences(saved, self._identity)
        if differences:
            raise ConfigMismatchError(
                f"state folder {str(self.state_dir)!r} was written under other settings: {'; '.join(differences)}; "
                "accepted: open_learner with the same settings and artifacts (the state resumes), or another "
                "state_dir to start anew", differences)
        if self._log is not None:
            self._verified_log = self._log.verify(ckpt.meta["log"])

    def _restore(self, ckpt) -> None:
        self.learner.engine.load_state_arrays(ckpt.parts["engine"], f"checkpoint {ckpt.path}")
        self.learner.load_state_arrays(ckpt.parts["learner"])
        if self.buffer is not None:
            self._log.restore(ckpt.meta["log"], self._verified_log)
            self.buffer.seen = int(ckpt.parts["buffer"]["seen"])
            self.buffer.rng.bit_generator.state = rng_from_state_array(ckpt.parts["buffer"]["rng"]).bit_generator.state
        self._samples_seen, self._task_samples = ckpt.meta["samples_seen"], ckpt.meta["task_samples"]
        self._app_state = ckpt.meta.get("app_state", {})

    def _check_stream(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        shape = ", ".join(map(str, self.input_shape))
        if not isinstance(x, np.ndarray) or x.ndim != 1 + len(self.input_shape) or x.shape[1:] != self.input_shape:
            got = x.shape if isinstance(x, np.ndarray) else type(x).__name__
            raise BatchError(f"x has shape {got}; accepted: (N, {shape}), N >= 1 (one sample: x[None])")
        if len(x) == 0:
            raise BatchError(f"x has 0 samples; accepted: (N, {shape}) with N >= 1")
        if x.dtype != np.float32:
            raise BatchError(f"x is {x.dtype}; accepted: float32 (convert with .astype(np.float32))")
        if not np.isfinite(x).all():
            bad = tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])
            raise BatchError(f"x{list(bad)} is {float(x[bad])}; accepted: finite values only")
        if not isinstance(y, np.ndarray) or not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),):
            got = f"{y.dtype} {y.shape}" if isinstance(y, np.ndarray) else type(y).__name__
            raise BatchError(f"y is {got}; accepted: an integer array of shape ({len(x)},), one label per sample")
        k = self.num_classes
        if (y < 0).any():
            i = int(np.argmax(y < 0))
            raise BatchError(f"y[{i}] = {int(y[i])}; accepted: labels in [0, {k - 1}]")
        if (y >= k).any():
            i = int(np.argmax(y >= k))
            raise BatchError(f"y[{i}] = {int(y[i])} is past the model's head: it was exported with {k} classes "
                             f"(labels 0..{k - 1}); to learn more classes, export the model on the host with a "
                             "larger head (e.g. `edgecl export --classes N`, or your model with N outputs) and "
                             "open a new state_dir with it")
        return x, y.astype(np.int64, copy=False)
