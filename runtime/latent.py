"""Latent replay: a frozen prefix encodes the stream, the suffix trains on latents, the buffer holds latents.

An export with `split=<point>` (`edgecl.exporters.latent`) holds the suffix's training graphs, whose
input is the latent, and `prefix.onnx`, the prefix's forward pass in inference mode with its weights
as inputs. `LatentReplay` puts them behind the engine interface the `Learner` and the loop use:

- from the start (`full=None`): the prefix is the one in the export (e.g. trained on the host) and
  only the suffix trains;
- after a task (`full=` the whole model's engine, `freeze_after=t`): the full engine trains until
  the end of task t; then `freeze` copies its prefix weights and statistics into the encoder and its
  suffix weights, statistics and optimizer state into the suffix engine (by name: both exports use
  the full model's names), and turns every stored input of the buffer into its latent.

From then on every stream batch goes through the prefix once (inference, no gradient) and a step
costs the suffix only, for the stream and the replayed samples alike; evaluation runs the prefix,
then the suffix. The buffer's capacity must be planned for latents (`plan_memory(sample_shape=)`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .buffer import ReplayBuffer
from .checks import check_input
from .engine import Engine
from .errors import ArtifactError
from .manifest import Manifest
from .session import make_session

PREFIX_FILE = "prefix.onnx"
META_KEY = "latent::meta"
PREFIX_KEY = "latent::prefix::"  # + "param::<name>" / "buffer::<name>"


class PrefixEncoder:
    """The frozen prefix of a split export: raw inputs -> latents, with weights set from outside.

    Args:
        artifact_dir: a folder written by `export(..., split=...)` (already verified); manifest: its manifest.
        threads: ONNX Runtime intra-op threads.
    Raises:
        ArtifactError: the export has no split (no manifest extra["latent"]).
    """

    def __init__(self, artifact_dir: Path, manifest: Manifest, threads: int | None = None):
        info = manifest.extra.get("latent")
        if not isinstance(info, dict):
            raise ArtifactError(f"{str(artifact_dir)!r} holds no latent-replay export (no manifest extra['latent']); "
                                "accepted: a folder written by export(..., split=<point>)")
        self.split = info["split"]
        self.input_shape = tuple(info["input_shape"])
        self.latent_shape = tuple(info["latent_shape"])
        self.shapes = {f"param::{n}": tuple(s) for n, s in info["prefix_parameters"].items()}
        self.shapes.update({f"buffer::{n}": tuple(s) for n, s in info["prefix_buffers"].items()})
        # forward multiply-accumulates per sample, x2: the encoding's FLOPs
        self.flops_per_sample = 2.0 * sum(row["macs_per_sample"] for row in info.get("prefix_layers", []))
        self._input_manifest = Manifest(engine=manifest.engine, input_shape=self.input_shape,
                                        num_classes=manifest.num_classes, parameters=(), buffers=(), files={})
        self._session = make_session(Path(artifact_dir) / PREFIX_FILE, threads)
        with np.load(Path(artifact_dir) / "init_state.npz", allow_pickle=False) as z:
            self._state = {k: z[f"prefix::{k}"].astype(np.float32) for k in self.shapes}

    def state(self) -> dict[str, np.ndarray]:
        """The prefix's weights and statistics, "param::<name>" / "buffer::<name>" -> array (copies)."""
        return {k: v.copy() for k, v in self._state.items()}

    def set_state(self, values: dict[str, np.ndarray], source: str = "values") -> None:
        """Replace all of the prefix's weights and statistics (checked first; unchanged on error).

        Raises:
            ArtifactError: as `check_state`.
        """
        self.check_state(values, source)
        self._state = {k: values[k].copy() for k in self.shapes}

    def check_state(self, values: dict[str, np.ndarray], source: str = "values") -> None:
        """Raise ArtifactError for a missing or unknown key, or an array not finite float32 of its shape."""
        if set(values) != set(self.shapes):
            raise ArtifactError(f"prefix state from {source} has keys {sorted(set(values) ^ set(self.shapes))} "
                                f"missing or unknown; accepted: {sorted(self.shapes)}")
        for k, shape in self.shapes.items():
            a = values[k]
            if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.shape != shape or not np.isfinite(a).all():
                got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                raise ArtifactError(f"prefix state {k} from {source} is {got}; accepted: finite float32 {shape}")

    def encode(self, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Latents (N, *latent_shape) float32 of raw inputs (N, *input_shape), in inference mode.

        Raises:
            BatchError: x is not a finite float32 array of the model's input shape.
        """
        x = check_input(self._input_manifest, x)
        chunks = [self._session.run(["latent"], {"x": x[i : i + batch_size], **self._state})[0]
                  for i in range(0, len(x), batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, *self.latent_shape), np.float32)


class LatentReplay:
    """The engine the Learner trains with latent replay: the full engine first (if any), then the suffix.

    Args:
        suffix: the engine of a split export. prefix: its `PrefixEncoder`.
        full: the whole model's engine, trained until `freeze` (None: the prefix is frozen from the start).
        freeze_after: the task after which `Learner.end_task` freezes the prefix (with `full` only).
        buffer: the replay buffer whose inputs `freeze` turns into latents (None: no replay).
    Raises:
        ValueError: engines of different kinds, or a buffer whose input shape fits neither phase.
    """

    def __init__(self, suffix: Engine, prefix: PrefixEncoder, full: Engine | None = None, freeze_after: int = 0,
                 buffer: ReplayBuffer | None = None):
        if isinstance(freeze_after, bool) or not isinstance(freeze_after, (int, np.integer)) or freeze_after < 0:
            raise ValueError(f"freeze_after={freeze_after!r}; accepted: an integer >= 0 (a task index)")
        if full is not None and full.name != suffix.name:
            raise ValueError(f"full engine {full.name!r}, suffix engine {suffix.name!r}; accepted: engines of one kind")
        self.suffix, self.prefix, self.full, self.buffer = suffix, prefix, full, None
        self.freeze_after = int(freeze_after) if full is not None else None
        self.frozen = full is None
        if buffer is not None:
            self.attach(buffer)
        after = "from the start" if self.frozen else f"after task {self.freeze_after + 1} (1-based)"
        self.name = f"{suffix.name}, latent replay at {prefix.split!r} {after}"
        self.optimizer_config = suffix.optimizer_config

    @property
    def first_sample_shape(self) -> tuple[int, ...]:
        """What the buffer holds first: raw inputs until the freeze, latents from a frozen start."""
        return self.prefix.latent_shape if self.frozen else self.prefix.input_shape

    def attach(self, buffer: ReplayBuffer) -> None:
        """The replay buffer `freeze` converts and a frozen `load_state_arrays` reshapes.

        Raises:
            ValueError: its sample_shape is not `first_sample_shape`.
        """
        if buffer.sample_shape != self.first_sample_shape:
            raise ValueError(f"buffer sample_shape={buffer.sample_shape}; accepted: {self.first_sample_shape}, the "
                             f"{'latent' if self.frozen else 'input'} shape it holds first")
        self.buffer = buffer

    @property
    def active(self) -> Engine:
        """The engine that trains now: the full one until `freeze`, the suffix's after."""
        return self.suffix if self.frozen else self.full

    @property
    def manifest(self) -> Manifest:
        return self.active.manifest

    @property
    def last_logits(self):
        return self.active.last_logits

    @property
    def encode_flops_per_sample(self) -> float:
        """FLOPs of encoding one stream sample (0 before the prefix is frozen)."""
        return self.prefix.flops_per_sample if self.frozen else 0.0

    def encode(self, x: np.ndarray) -> np.ndarray:
        """What the active engine trains on: x itself before the freeze, its latent after."""
        return self.prefix.encode(x) if self.frozen else x

    def freeze(self) -> None:
        """Freeze the prefix at the full engine's current weights (see the module docstring); once."""
        if self.frozen:
            return
        arrays = self.full.state_arrays()
        prefix_state = {k: arrays[k] for k in self.prefix.shapes}
        names = self.suffix.param_shapes.keys() | self.suffix.buffer_shapes.keys()
        suffix_state = {k: v for k, v in arrays.items()
                        if k in ("meta", "optim_meta") or k.rsplit("::", 1)[-1] in names}
        self.prefix.set_state(prefix_state, "the full engine")
        self.suffix.load_state_arrays(suffix_state, "the full engine's suffix")
        if self.buffer is not None:
            self.buffer.map_inputs(self.prefix.encode, self.prefix.latent_shape)
        self.frozen = True

    # --- the engine interface the Learner and the loop use -------------------------------
    def loss_and_grads(self, *args, **kwargs):
        return self.active.loss_and_grads(*args, **kwargs)

    def apply_gradients(self, grads):
        self.active.apply_gradients(grads)

    def step(self, *args, **kwargs):
        return self.active.step(*args, **kwargs)

    def parameters(self):
        return self.active.parameters()

    def masks(self):
        return self.active.masks()

    def evaluate(self, x, batch_size: int = 512) -> np.ndarray:
        """Logits of raw inputs: the full engine's before the freeze, prefix then suffix after."""
        if not self.frozen:
            return self.full.evaluate(x, batch_size)
        return self.suffix.evaluate(self.prefix.encode(x, batch_size), batch_size)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The active engine's state, the phase, and after the freeze the prefix's weights."""
        out = self.active.state_arrays()
        out[META_KEY] = np.frombuffer(json.dumps({"frozen": self.frozen}).encode(), np.uint8).copy()
        if self.frozen:
            out.update({PREFIX_KEY + k: v for k, v in self.prefix.state().items()})
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray], source: str = "arrays") -> None:
        """Restore `state_arrays`: the phase, the active engine and the prefix, all or nothing; a frozen
        state reshapes the buffer (restored by the caller next) to hold latents.

        Raises:
            ArtifactError: no readable phase, a state from before the freeze in a run without a full
                engine, or a fault of the engine's or the prefix's arrays (see `Engine.load_state_arrays`).
        """
        arrays = dict(arrays)
        try:
            frozen = json.loads(arrays.pop(META_KEY).tobytes().decode())["frozen"]
            if not isinstance(frozen, bool):
                raise ValueError(f"frozen is {frozen!r}")
        except Exception as e:
            raise ArtifactError(f"engine state {source} has no readable {META_KEY} ({type(e).__name__}: {e}); "
                                "accepted: a state of LatentReplay.state_arrays") from None
        if not frozen and self.full is None:
            raise ArtifactError(f"engine state {source} is from before the freeze; accepted: a frozen state "
                                "(this run has no full engine)")
        prefix = {k[len(PREFIX_KEY):]: arrays.pop(k) for k in list(arrays) if k.startswith(PREFIX_KEY)}
        engine = self.suffix if frozen else self.full
        if frozen:
            self.prefix.check_state(prefix, source)
        elif prefix:
            raise ArtifactError(f"engine state {source} holds prefix weights but is from before the freeze; "
                                "accepted: a state of LatentReplay.state_arrays")
        engine.load_state_arrays(arrays, source)
        if frozen:
            self.prefix.set_state(prefix, source)
        if frozen and self.buffer is not None and self.buffer.sample_shape != self.prefix.latent_shape:
            self.buffer.map_inputs(None, self.prefix.latent_shape)
        self.frozen = frozen
