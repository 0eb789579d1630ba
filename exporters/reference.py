"""The torch reference engine: eager torch behind the same interface as the ONNX engines.

Host only. Parity tests hold the ONNX engines against it from the same weights, and
benchmarks use it as the baseline a user would otherwise pick.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from edgecl.runtime.checks import check_batch, check_outputs
from edgecl.runtime.engine import Batch, Engine, StepOutputs
from edgecl.runtime.manifest import Manifest, load_manifest
from edgecl.runtime.optim import OptimizerConfig, OptimizerKind

from .spec import check_supported, resolve_masks, resolve_trainable, tensor_specs


class TorchEngine(Engine):
    """Eager torch training of `model` with masks applied as weight * mask in the forward.

    Args:
        model: the torch model (copied; the caller's model is never modified).
        input_shape: shape of one sample, e.g. (1, 8, 8). num_classes: logits width.
        optimizer: the optimizer to use. masks / trainable: as in `edgecl.exporters.export`.
        threads: torch intra-op threads (None leaves torch's setting).
        dropout: keep Dropout active in training (off by default, as in `export`).
        extra: manifest extras to carry (the layer table for FLOPs, activation bytes for budgets).
    """

    name = "torch"

    def __init__(self, model: nn.Module, input_shape, num_classes: int, optimizer: OptimizerConfig = OptimizerConfig(),
                 masks=None, trainable=None, threads: int | None = None, dropout: bool = False,
                 extra: dict | None = None):
        check_supported(model)
        self.model = copy.deepcopy(model).train()
        if not dropout:  # as in the exported graphs: Dropout is off unless asked for
            for module in self.model.modules():
                for child_name, child in module.named_children():
                    if isinstance(child, nn.Dropout):
                        setattr(module, child_name, nn.Identity())
        mask_arrays = resolve_masks(self.model, masks)
        trainable_names = resolve_trainable(self.model, trainable)
        params, buffers = tensor_specs(self.model, mask_arrays, trainable_names)
        manifest = Manifest(engine="torch", input_shape=tuple(input_shape), num_classes=num_classes,
                            parameters=params, buffers=buffers, model_name=type(model).__name__,
                            extra=dict(extra or {}))
        super().__init__(manifest, optimizer)
        if threads:
            torch.set_num_threads(threads)
        self._params = dict(self.model.named_parameters())
        for name, p in self._params.items():
            p.requires_grad_(name in trainable_names)
        self._masks = {k: torch.from_numpy(v.copy()) for k, v in mask_arrays.items()}
        self._apply_masks()
        trainable_params = [self._params[n] for n in self.trainable_shapes]
        c = optimizer
        if c.kind is OptimizerKind.SGD:
            self.optimizer = torch.optim.SGD(trainable_params, lr=c.lr, momentum=c.momentum, dampening=c.dampening,
                                             nesterov=c.nesterov, weight_decay=c.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(trainable_params, lr=c.lr, betas=c.betas, eps=c.eps,
                                               weight_decay=c.weight_decay)

    @classmethod
    def from_artifacts(cls, model: nn.Module, artifact_dir, optimizer: OptimizerConfig = OptimizerConfig(),
                       threads: int | None = None) -> TorchEngine:
        """A reference engine with the same parameters, masks and trainable set as an export."""
        manifest = load_manifest(artifact_dir)
        with np.load(f"{artifact_dir}/init_state.npz") as z:
            masks = {k.split("::", 1)[1]: z[k] for k in z.files if k.startswith("mask::")}
        return cls(model, manifest.input_shape, manifest.num_classes, optimizer, masks=masks,
                   trainable=manifest.trainable_names, threads=threads, dropout=manifest.extra.get("dropout", False),
                   extra={k: v for k, v in manifest.extra.items() if k in ("layers", "activation_bytes_per_sample")})

    # --- helpers ----------------------------------------------------------
    @torch.no_grad()
    def _apply_masks(self):
        for name, m in self._masks.items():
            self._params[name].mul_(m)

    def _forward(self, x: torch.Tensor, buffers: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits with the masked weights; in training mode BatchNorm updates `buffers`, not the model's own."""
        tensors = {n: self._params[n] * m for n, m in self._masks.items()}
        tensors.update(buffers or {})
        if not tensors:
            return self.model(x)
        return torch.func.functional_call(self.model, tensors, (x,), strict=False)

    def _train_pass(self, batch: Batch, fused: bool) -> StepOutputs:
        """Forward and backward on copies of the running statistics; fused: gradients into .grad (views returned)."""
        self.model.train()
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        logits = self._forward(torch.from_numpy(batch.x), buffers)
        ce = nn.functional.cross_entropy(logits, torch.from_numpy(batch.y), reduction="none")
        loss = (torch.from_numpy(batch.sample_weight) * ce).sum()
        if batch.logit_weight.any():
            mse = ((logits - torch.from_numpy(batch.target_logits)) ** 2).mean(dim=1)
            loss = loss + (torch.from_numpy(batch.logit_weight) * mse).sum()
        names = list(self.trainable_shapes)
        if fused:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grads = {n: self._params[n].grad.numpy() for n in names}
        else:
            grads = {n: g.detach().numpy().copy()
                     for n, g in zip(names, torch.autograd.grad(loss, [self._params[n] for n in names]))}
        return StepOutputs(float(loss.detach()), logits.detach().numpy().copy(), grads,
                           {n: b.numpy() for n, b in buffers.items()})

    # --- engine interface -------------------------------------------------
    def _forward_backward(self, batch: Batch) -> StepOutputs:
        return self._train_pass(batch, fused=False)

    @torch.no_grad()
    def _commit_buffers(self, buffers):
        own = dict(self.model.named_buffers())
        for name, value in buffers.items():
            own[name].copy_(torch.from_numpy(value))

    def _apply_gradients(self, grads):
        for name, g in grads.items():
            self._params[name].grad = torch.from_numpy(g)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._apply_masks()

    def step(self, x, y, sample_weight=None, target_logits=None, logit_weight=None) -> float:
        """Fused eager step (backward into .grad, then optimizer.step()): the fair baseline; checked as Engine.step."""
        b = check_batch(self.manifest, x, y, sample_weight, target_logits, logit_weight)
        try:
            out = self._train_pass(b, fused=True)
            self._check_update(out.grads, check_outputs(b.x, out.loss, out.logits, out.grads, out.buffers))
        except BaseException:
            self.optimizer.zero_grad(set_to_none=True)
            raise
        self._commit(out)
        self.optimizer.step()
        self._apply_masks()
        self.steps_done += 1
        return out.loss

    def _weight(self, name):
        return self._params[name].detach().numpy()

    def _optimizer_slots(self, name):
        state = self.optimizer.state.get(self._params[name], {})
        slots = [state.get(k) for k in ("momentum_buffer", "exp_avg")]
        return tuple(None if s is None else s.numpy() for s in slots)

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _set_learning_rate(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def _evaluate(self, x):
        self.model.eval()
        try:
            return self._forward(torch.from_numpy(x)).numpy().copy()
        finally:
            self.model.train()

    def parameters(self):
        return {n: p.detach().numpy().copy() for n, p in self._params.items()}

    @torch.no_grad()
    def _set_parameters(self, values):
        for n, v in values.items():
            self._params[n].copy_(torch.from_numpy(v))
        self._apply_masks()

    def masks(self):
        return {n: m.numpy().copy() for n, m in self._masks.items()}

    def _set_masks(self, masks):
        for n, m in masks.items():
            self._masks[n] = torch.from_numpy(m.copy())
        self._apply_masks()

    def buffers(self):
        return {n: b.detach().numpy().copy() for n, b in self.model.named_buffers() if b.dtype.is_floating_point}

    def _state_arrays(self):
        out = {f"param::{n}": v for n, v in self.parameters().items()}
        out.update({f"mask::{n}": v for n, v in self.masks().items()})
        out.update({f"buffer::{n}": v for n, v in self.buffers().items()})
        for name, p in self._params.items():
            for slot, val in self.optimizer.state.get(p, {}).items():
                out[f"optim::{slot}::{name}"] = val.numpy().copy() if isinstance(val, torch.Tensor) else np.asarray(val)
        return out

    def _optimizer_specs(self, steps):
        if steps == 0:
            return {}
        f32 = np.dtype(np.float32)
        if self.optimizer_config.kind is OptimizerKind.SGD:
            slots = {"momentum_buffer": None} if self.optimizer_config.momentum else {}
        else:
            slots = {"step": ((), f32), "exp_avg": None, "exp_avg_sq": None}  # torch keeps `step` as a float tensor
        return {f"optim::{slot}::{n}": spec or (shape, f32)
                for n, shape in self.trainable_shapes.items() for slot, spec in slots.items()}

    @torch.no_grad()
    def _load_state_arrays(self, arrays, source):
        own_buffers = dict(self.model.named_buffers())
        for key, val in arrays.items():
            kind, rest = key.split("::", 1)
            if kind == "param":
                self._params[rest].copy_(torch.from_numpy(val))
            elif kind == "mask":
                self._masks[rest] = torch.from_numpy(val.copy())
            elif kind == "buffer":
                own_buffers[rest].copy_(torch.from_numpy(val))
        self.optimizer.state.clear()
        for key, val in arrays.items():
            if key.startswith("optim::"):
                _, slot, name = key.split("::", 2)
                self.optimizer.state[self._params[name]][slot] = torch.from_numpy(val.copy())
