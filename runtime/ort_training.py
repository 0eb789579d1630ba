"""The `ort-training` engine: onnxruntime-training's Module / Optimizer behind the Engine interface.

Runs the artifacts `edgecl.exporters.ort_training` writes (training_model.onnx,
eval_model.onnx, checkpoint, optimizer_sgd.onnx / optimizer_adamw.onnx) on a host or
board that has the `onnxruntime-training-cpu` wheel (x86-64 only, last release 1.19.2).

What ORT's graphs do and what this module adds, so the updates equal torch's:
- SGD: ORT's graph computes only `w -= lr * g`; weight decay, momentum, dampening and
  Nesterov are applied to the gradient here first (torch.optim.SGD's formulas), and the
  momentum buffers are plain arrays saved as `optim::momentum_buffer::<name>`;
- AdamW: ORT's graph (torch's variant, adam_mode=0) holds betas and eps fixed at export,
  so other values are refused at open time; decoupled weight decay is applied here before
  the step (w *= 1 - lr * weight_decay, as torch.optim.AdamW). ORT keeps the moments in
  its checkpoint state and offers no way to read or write them from Python: `save` stores
  ORT's own checkpoint (include_optimizer_state=True) as the uint8 array
  `optim::ort_checkpoint::adamw`, and `load` rebuilds the Module and Optimizer from it;
- BatchNorm: ORT never writes the updated running statistics back to its checkpoint and
  computes the running variance from the biased batch variance; the training graph
  outputs the updated statistics and this engine writes them back with torch's unbiased
  correction var += (var - (1 - momentum) * old) / (n - 1), n = N * H * W;
- masks are frozen parameters `mask::<name>` multiplied into the weights inside the graph;
  after each step the weights are multiplied by their masks again, so masked entries stay 0.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np

from .engine import Batch, Engine, StepOutputs
from .errors import ArtifactError, BatchError
from .manifest import Manifest
from .optim import OptimizerConfig, OptimizerKind
from .session import import_onnxruntime

onnxruntime = import_onnxruntime()  # without the training build's torch probe (see session.py)

ADAMW_STATE_KEY = "optim::ort_checkpoint::adamw"


def _training_api():
    """Import `onnxruntime.training.api` without importing torch.

    `onnxruntime/training/__init__.py` imports its `ortmodule`/`optim` helpers, which import
    torch; the `api` submodules (Module, Optimizer, CheckpointState) need only
    onnxruntime.capi. When the real package is not loaded yet, a bare package module whose
    `__path__` is the real folder is registered, so importing `api` runs only `api/`.

    Raises:
        ArtifactError: the installed onnxruntime has no training support.
    """
    if "onnxruntime.training" not in sys.modules:
        folder = Path(onnxruntime.__file__).parent / "training"
        if not (folder / "api").is_dir():
            raise ArtifactError(
                f"the ort-training engine needs onnxruntime-training-cpu; the installed onnxruntime "
                f"{onnxruntime.__version__} has no training API (use the portable engine on this device)")
        spec = importlib.machinery.ModuleSpec("onnxruntime.training", None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        package = importlib.util.module_from_spec(spec)  # sets __path__ from the spec
        sys.modules["onnxruntime.training"] = package
        onnxruntime.training = package
    try:
        from onnxruntime.training import api
    except ImportError as e:
        raise ArtifactError(f"the ort-training engine needs onnxruntime-training-cpu ({e})") from e
    return api


class OrtTrainingEngine(Engine):
    """Training with onnxruntime-training artifacts; parity with the torch reference engine.

    Args:
        artifact_dir: folder written by `edgecl.exporters.export(..., engine="ort-training")`.
        manifest: its checked manifest. optimizer: kind and hyper-parameters.
        threads: ORT intra-op threads (None: ORT's default); spinning is always off.
    Raises:
        ArtifactError: files ORT cannot load, or graphs that do not match the manifest.
        ValueError: AdamW betas/eps other than those fixed in the exported optimizer graph.
    """

    name = "ort-training"

    def __init__(self, artifact_dir: Path, manifest: Manifest, optimizer: OptimizerConfig,
                 threads: int | None = None):
        super().__init__(manifest, optimizer)
        self.artifact_dir = self._dir = Path(artifact_dir)
        extra = manifest.extra
        try:
            self._optimizer_file = self._dir / extra["optimizer_files"][optimizer.kind.value]
            self._graph = dict(extra["param_graph_names"])
            self._mask_graph = dict(extra["mask_graph_names"])
            self._buffer_graph = dict(extra["buffer_graph_names"])
            self._batchnorm = list(extra["batchnorm"])
            adamw = extra["adamw"]
        except KeyError as e:
            raise ArtifactError(f"manifest extra of {str(self._dir)!r} lacks {e}; export again") from e
        if optimizer.kind is OptimizerKind.ADAMW:
            exported = (tuple(adamw["betas"]), float(adamw["eps"]))
            if (optimizer.betas, optimizer.eps) != exported:
                raise ValueError(
                    f"AdamW betas={optimizer.betas}, eps={optimizer.eps}: the exported optimizer graph fixes "
                    f"betas={exported[0]}, eps={exported[1]}; accepted: those values (weight_decay and lr are free)")
        self._api = _training_api()
        self._options = self._session_options(threads)
        self._lr = optimizer.lr
        self._momentum: dict[str, np.ndarray] = {}
        self._open(self._dir / "checkpoint")
        self._apply_masks(self._mask_graph)

    # --- ORT objects ------------------------------------------------------
    @staticmethod
    def _session_options(threads: int | None) -> onnxruntime.SessionOptions:
        options = onnxruntime.SessionOptions()
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads={threads}; accepted: None or >= 1")
            options.intra_op_num_threads = int(threads)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def _open(self, checkpoint: Path, what: str = "") -> None:
        """Build CheckpointState, Module and Optimizer (replacing the current ones only on success).

        Args:
            what: the checkpoint's name in an error message (default: the artifact folder's).
        """
        api = self._api
        try:
            state = api.CheckpointState.load_checkpoint(checkpoint)
            module = api.Module(self._dir / "training_model.onnx", state, self._dir / "eval_model.onnx",
                                session_options=self._options)
            # ORT's own SGD graph declares its flag output [1] while the op schema infers a scalar,
            # and ORT warns about it on every load: warnings are off while the optimizer session
            # is built (a session copies its options, so later sessions are not affected).
            level = self._options.log_severity_level
            self._options.log_severity_level = 3
            try:
                optimizer = api.Optimizer(self._optimizer_file, module)
            finally:
                self._options.log_severity_level = level
        except Exception as e:  # ORT raises RuntimeError / its own Fail types for bad files
            what = what or f"the artifacts in {str(self._dir)!r}"
            raise ArtifactError(f"onnxruntime-training cannot load {what}: {e}") from e
        expected = self.manifest.extra.get("train_inputs")
        if module.input_names() != expected:
            raise ArtifactError(f"training graph inputs are {module.input_names()}; the manifest says {expected}")
        # Every write below goes through `Parameter.data` / `.grad`, which onnxruntime 1.19 returns
        # as writable numpy views of the tensors its sessions read: check that, once, loudly.
        probe = state.parameters[next(iter(self._graph.values()))]
        if probe.data.flags.owndata or not probe.data.flags.writeable:
            raise ArtifactError(f"onnxruntime {onnxruntime.__version__} returns parameter copies, not views; "
                                f"the ort-training engine needs onnxruntime-training-cpu 1.19")
        self._state, self._module, self._optimizer = state, module, optimizer
        self._outputs = module.output_names()
        self._optimizer.set_learning_rate(self._lr)

    def _param(self, graph_name: str):
        """ORT's Parameter: `.data` and `.grad` are writable numpy views of its tensors (CPU)."""
        return self._state.parameters[graph_name]

    def _apply_masks(self, names) -> None:
        """Zero the weights where their mask is 0 (in place, through ORT's parameter views)."""
        for name in names:
            self._param(self._graph[name]).data[...] *= self._param(self._mask_graph[name]).data

    # --- engine interface -------------------------------------------------
    def _forward_backward(self, batch: Batch) -> StepOutputs:
        """Loss, logits, gradients and new running statistics; ORT's forward/backward writes none of its
        parameters, masks or running statistics (only its gradient buffers), and nothing is written back here."""
        n = batch.x.shape[0]
        for layer in self._batchnorm:
            if n * layer["spatial"] < 2:
                raise BatchError(f"x has {n} sample(s) and BatchNorm {layer['mean'].rsplit('.', 1)[0]!r} sees "
                                 f"{layer['spatial']} value(s) per channel per sample; accepted: N * H * W >= 2")
        self._module.train()
        self._module.lazy_reset_grad()  # the graph accumulates into the gradient buffers otherwise
        outs = dict(zip(self._outputs, self._module(batch.x, batch.y, batch.sample_weight, batch.target_logits,
                                                    batch.logit_weight)))
        buffers = {}
        for layer in self._batchnorm:
            buffers.update(self._running_stats(layer, outs, n))
        grads = {name: self._param(self._graph[name]).grad.copy() for name in self.trainable_shapes}
        return StepOutputs(float(outs["loss"]), np.array(outs["logits"]), grads, buffers)

    def _running_stats(self, layer: dict, outs: dict, n: int) -> dict[str, np.ndarray]:
        """BatchNorm's updated running statistics, with torch's unbiased variance."""
        count = n * layer["spatial"]
        keep = np.float32(1.0 - layer["momentum"])  # ONNX momentum: the weight of the old value
        old_var = self._param(self._buffer_graph[layer["var"]]).data
        new_var = outs["updated::" + layer["var"]]
        # ORT: keep*old + (1-keep)*biased; torch: keep*old + (1-keep)*biased*count/(count-1)
        unbiased = new_var + (new_var - keep * old_var) / np.float32(count - 1)
        return {layer["var"]: unbiased, layer["mean"]: np.array(outs["updated::" + layer["mean"]])}

    def _commit_buffers(self, buffers):
        for name, value in buffers.items():
            self._param(self._buffer_graph[name]).data[...] = value

    def _apply_gradients(self, grads):
        c = self.optimizer_config
        if c.kind is OptimizerKind.SGD:
            grads = self._sgd_direction(grads)
        elif c.weight_decay:
            for name in grads:  # torch.optim.AdamW: decoupled decay before the moment update
                self._param(self._graph[name]).data[...] *= np.float32(1 - self._lr * c.weight_decay)
        for name, g in grads.items():
            self._param(self._graph[name]).grad[...] = g
        self._optimizer.step()
        self._apply_masks(self._mask_graph)

    def _sgd_direction(self, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """torch.optim.SGD's update direction (ORT's SGD graph then does w -= lr * direction)."""
        c = self.optimizer_config
        out = {}
        for name, g in grads.items():
            if c.weight_decay:
                g = g + np.float32(c.weight_decay) * self._param(self._graph[name]).data
            if c.momentum:
                buf = self._momentum.get(name)
                if buf is None:
                    buf = self._momentum[name] = np.array(g, np.float32)
                else:
                    buf *= np.float32(c.momentum)
                    buf += np.float32(1 - c.dampening) * g
                g = g + np.float32(c.momentum) * buf if c.nesterov else buf
            out[name] = g
        return out

    def _evaluate(self, x):
        self._module.eval()
        try:
            return np.array(self._module(x), np.float32)
        finally:
            self._module.train()

    def parameters(self) -> dict[str, np.ndarray]:
        return {name: self._param(g).data.copy() for name, g in self._graph.items()}

    def _set_parameters(self, values):
        for name, v in values.items():
            self._param(self._graph[name]).data[...] = v
        self._apply_masks([n for n in values if n in self._mask_graph])

    def masks(self) -> dict[str, np.ndarray]:
        return {name: self._param(g).data.copy() for name, g in self._mask_graph.items()}

    def _set_masks(self, masks):
        for name, m in masks.items():
            self._param(self._mask_graph[name]).data[...] = m
        self._apply_masks(masks)

    def buffers(self) -> dict[str, np.ndarray]:
        return {name: self._param(g).data.copy() for name, g in self._buffer_graph.items()}

    def _weight(self, name):
        return self._param(self._graph[name]).data

    def _optimizer_slots(self, name):
        return self._momentum.get(name), None  # AdamW's moments: inside ORT, unread

    @property
    def learning_rate(self) -> float:
        return self._lr

    def _set_learning_rate(self, lr: float) -> None:
        """The learning rate of the next steps (ORT's optimizer and the numpy weight decay)."""
        self._lr = lr
        self._optimizer.set_learning_rate(lr)

    def _state_arrays(self) -> dict[str, np.ndarray]:
        out = {f"param::{n}": v for n, v in self.parameters().items()}
        out.update({f"mask::{n}": v for n, v in self.masks().items()})
        out.update({f"buffer::{n}": v for n, v in self.buffers().items()})
        out.update({f"optim::momentum_buffer::{n}": v.copy() for n, v in self._momentum.items()})
        if self.optimizer_config.kind is OptimizerKind.ADAMW:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "checkpoint"
                self._api.CheckpointState.save_checkpoint(self._state, path, include_optimizer_state=True)
                out[ADAMW_STATE_KEY] = np.frombuffer(path.read_bytes(), np.uint8).copy()
        return out

    def _optimizer_specs(self, steps):
        if self.optimizer_config.kind is OptimizerKind.ADAMW:
            return {ADAMW_STATE_KEY: (None, np.dtype(np.uint8))}  # ORT's checkpoint bytes, any length
        if not (self.optimizer_config.momentum and steps):
            return {}
        return {f"optim::momentum_buffer::{n}": (s, np.dtype(np.float32)) for n, s in self.trainable_shapes.items()}

    def _load_state_arrays(self, arrays, source) -> None:
        if ADAMW_STATE_KEY in arrays:  # an unreadable checkpoint raises in _open before anything is replaced
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "checkpoint"
                path.write_bytes(arrays[ADAMW_STATE_KEY].tobytes())
                # ORT restores moments and step count only when it builds the Optimizer
                self._open(path, f"{ADAMW_STATE_KEY} of engine state {source}")
        self._momentum = {k.split("::", 2)[2]: v.copy() for k, v in arrays.items()
                          if k.startswith("optim::momentum_buffer::")}
        graph_names = {"param": self._graph, "mask": self._mask_graph, "buffer": self._buffer_graph}
        for key, val in arrays.items():
            section, _, name = key.partition("::")
            if section in graph_names:
                self._param(graph_names[section][name]).data[...] = val
