"""Continual-learning strategies over any engine: fine-tuning, joint, ER, DER++, and SparCL on ER / DER++.

One class, `Learner`, reads top to bottom: `begin_task`, `observe` (one optimizer step on a
stream batch plus replay), `begin_epoch` (SparCL's mask updates and data removal), and
`end_task`. It composes an engine, a replay buffer, masks (TDM), gradient masks (DGM) and
forgetting statistics (DDR); the math lives in `edgecl.runtime.sparcl`, and on whole channels
(`structure="channel"`) in `edgecl.runtime.channel_sparcl`.

Losses (Buzzega et al., NeurIPS 2020, "Dark Experience for General Continual Learning"):
- ER:    mean CE over the stream batch and a replayed batch, concatenated;
- DER++: CE(stream) + alpha * MSE(logits(buf1), stored logits(buf1)) + beta * CE(buf2).
SparCL (Wang et al., NeurIPS 2022) adds TDM, DGM and DDR, each switchable for ablations.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import warnings
from enum import Enum

import numpy as np

from .buffer import ReplayBuffer
from .channel_sparcl import STRUCTURES, ChannelDGM, ChannelMasks
from .checks import check_named
from .engine import Engine
from .flops import dense_training_flops, training_flops
from .latent import LatentReplay
from .sparcl import (DDRSchedule, DGM, ForgettingTracker, TDMSchedule, ddr_schedule, initial_mask, prune_and_regrow,
                     select_removal, tdm_schedule)


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy scalars are numbers.Real


class Method(str, Enum):
    FINETUNE = "finetune"
    JOINT = "joint"
    ER = "er"
    DERPP = "derpp"


@dataclasses.dataclass(frozen=True)
class SparCLConfig:
    """SparCL switches and knobs (released-code defaults).

    Args:
        sparsity: fraction of each masked weight tensor that is zero (0.75 / 0.90 / 0.95).
        tdm / dgm / ddr: task-aware dynamic masking, dynamic gradient masking, dynamic data removal.
        grad_density: fraction of each gradient kept by DGM; dgm_every: steps between recomputations.
        dense_first_last: keep the first layer (stem) and the classifier dense, as SparCL allows.
        structure: "weight" (masks on weight entries, the paper's mode: counted savings only) or
            "channel" (whole output channels on a channel-structured export, computed on narrower
            tensors: `channel_sparcl`); sparsity is then the share of each channel set pruned.
    """

    sparsity: float = 0.75
    tdm: bool = True
    dgm: bool = True
    ddr: bool = True
    grad_density: float = 0.2
    dgm_every: int = 30
    tdm_schedule: TDMSchedule = TDMSchedule()
    ddr_schedule: DDRSchedule = DDRSchedule()
    dense_first_last: bool = True
    structure: str = "weight"

    def __post_init__(self):
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure={self.structure!r}; accepted: {', '.join(STRUCTURES)}")
        if not (_real(self.sparsity) and 0.0 <= self.sparsity < 1.0):
            raise ValueError(f"sparsity={self.sparsity!r}; accepted: 0 <= sparsity < 1 (e.g. 0.75, 0.9)")
        if not (_real(self.grad_density) and 0.0 < self.grad_density <= 1.0):
            raise ValueError(f"grad_density={self.grad_density!r}; accepted: in (0, 1]")
        for name in ("tdm", "dgm", "ddr", "dense_first_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}; accepted: True or False")
        if isinstance(self.dgm_every, bool) or not isinstance(self.dgm_every, (int, np.integer)) or self.dgm_every < 1:
            raise ValueError(f"dgm_every={self.dgm_every!r}; accepted: an integer >= 1 (steps)")
        if isinstance(self.tdm_schedule, dict):
            object.__setattr__(self, "tdm_schedule", TDMSchedule.from_dict(self.tdm_schedule))
        if isinstance(self.ddr_schedule, dict):
            object.__setattr__(self, "ddr_schedule", DDRSchedule.from_dict(self.ddr_schedule))
        for name, cls in (("tdm_schedule", TDMSchedule), ("ddr_schedule", DDRSchedule)):
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"{name}={getattr(self, name)!r}; accepted: a {cls.__name__} or its dict")


@dataclasses.dataclass(frozen=True)
class StrategyConfig:
    """Which strategy, its replay batch and DER++ weights, and SparCL on top (None: dense).

    Raises:
        ValueError: unknown method, negative weights, SparCL on fine-tuning or joint.
    """

    method: Method = Method.DERPP
    replay_batch: int = 32
    alpha: float = 0.1
    beta: float = 0.5
    sparcl: SparCLConfig | None = None

    def __post_init__(self):
        try:
            object.__setattr__(self, "method", Method(self.method))
        except ValueError:
            raise ValueError(f"method={self.method!r}; accepted: {', '.join(m.value for m in Method)}") from None
        if isinstance(self.sparcl, dict):
            object.__setattr__(self, "sparcl", SparCLConfig(**self.sparcl))
        if self.sparcl is not None and not isinstance(self.sparcl, SparCLConfig):
            raise ValueError(f"sparcl={self.sparcl!r}; accepted: a SparCLConfig, its dict, or None (dense)")
        replay = self.replay_batch
        if isinstance(replay, bool) or not isinstance(replay, (int, np.integer)) or replay < 1:
            raise ValueError(f"replay_batch={replay!r}; accepted: an integer >= 1")
        for name in ("alpha", "beta"):  # DER++'s loss weights
            value = getattr(self, name)
            if not (_real(value) and np.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r}; accepted: a finite number >= 0")

    @property
    def uses_buffer(self) -> bool:
        return self.method in (Method.ER, Method.DERPP)

    @property
    def label(self) -> str:
        base = {"finetune": "Fine-tune", "joint": "Joint", "er": "ER", "derpp": "DER++"}[self.method.value]
        if self.sparcl is None:
            return base
        s = self.sparcl
        parts = [name for name, on in (("TDM", s.tdm), ("DGM", s.dgm), ("DDR", s.ddr)) if not on]
        off = f" w/o {'+'.join(parts)}" if parts else ""
        return f"SparCL-{base} {s.sparsity:.2f}{' channel' if s.structure == 'channel' else ''}{off}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["method"] = self.method.value
        return d


class Learner:
    """One strategy on one engine. The loop calls begin_task, begin_epoch, observe, end_task.

    Args:
        engine: any engine (portable, ort-training, torch reference); exported with masks on
            the weights SparCL sparsifies. A `LatentReplay` (dense strategies only): the stream is
            encoded by the frozen prefix once it is frozen, the buffer holds latents, and `end_task`
            of its `freeze_after` task freezes the prefix.
        config: the strategy. buffer: the replay buffer (ER / DER++), else None.
        rng: generator for masks' regrowth and replay sampling order.
    """

    def __init__(self, engine: Engine, config: StrategyConfig, buffer: ReplayBuffer | None, rng: np.random.Generator):
        if config.uses_buffer and buffer is None:
            raise ValueError(f"{config.method.value} replays examples: pass a ReplayBuffer")
        self.engine, self.config, self.buffer, self.rng = engine, config, buffer, rng
        self.latent = engine if isinstance(engine, LatentReplay) else None
        if self.latent is not None and config.sparcl is not None:
            raise ValueError(f"{config.label} with latent replay; accepted: latent replay with a dense strategy "
                             "(sparcl=None)")
        if self.latent is not None and self.latent.buffer is not buffer:
            raise ValueError("the LatentReplay engine was built with another buffer; accepted: the Learner's buffer")
        layers = engine.manifest.extra.get("layers", [])
        self.layers = layers
        s = config.sparcl
        self.channel_masks = None  # structure="channel": the active channels of each set
        self.dgm = None
        if s is not None and s.structure == "channel":
            self.channel_masks = ChannelMasks(engine, 1.0 - s.sparsity)
            self.sparse_names = self.channel_masks.weights
            if s.dgm:
                self.dgm = ChannelDGM(s.grad_density, s.dgm_every, self.sparse_names, self.channel_masks.gathers,
                                      self.channel_masks.sets, engine.channels)
        else:
            sparse = [name for name in engine.manifest.masked_names]
            if s is not None and s.dense_first_last and layers:
                keep_dense = {layers[0]["weight"], layers[-1]["weight"]}
                sparse = [name for name in sparse if name not in keep_dense]
            if s is not None and not sparse:
                raise ValueError("SparCL needs masked weights: export with masks='weights'")
            self.sparse_names = sparse if s is not None else []
            if s is not None and s.dgm:
                self.dgm = DGM(s.grad_density, s.dgm_every, self.sparse_names)
        self.task = -1
        self.step = 0
        self.masks_ready = False  # SparCL's first masks set (initial_masks): until then the engine's are dense
        self.tracker: ForgettingTracker | None = None
        self.active: np.ndarray | None = None  # bool (n,), examples of the task still trained on
        self.last_grads: dict[str, np.ndarray] = {}
        self.train_flops = 0.0
        self.dense_train_flops = 0.0
        # FedProx's proximal term (Li et al., MLSys 2020): (mu, anchor weights) adds mu * (w - anchor) to the
        # gradients of the anchored weights; set per federated round (`set_proximal`), never saved
        self.proximal: tuple[float, dict[str, np.ndarray]] | None = None
        self._refresh_flops()

    # --- task and epoch boundaries -----------------------------------------------------
    def begin_task(self, task: int, n_examples: int) -> None:
        """Restart SparCL's schedules and statistics for a task of `n_examples` training examples."""
        self.task = task
        self.active = np.ones(n_examples, bool)
        self.tracker = ForgettingTracker(n_examples) if self._sparcl_on("ddr") else None
        if self.dgm is not None:
            self.dgm.reset()

    def begin_epoch(self, epoch: int, epochs_per_task: int) -> None:
        """SparCL's per-epoch work: mask update (TDM) and data removal (DDR) at scheduled epochs."""
        s = self.config.sparcl
        if s is None:
            return
        if epoch == 0 and self.task == 0:
            self.initial_masks()
        elif s.tdm and epoch in tdm_schedule(epochs_per_task, s.tdm_schedule):
            self.update_masks()
        if s.ddr and self.tracker is not None:
            fraction = ddr_schedule(epochs_per_task, s.ddr_schedule).get(epoch)
            if fraction:
                drop = select_removal(self.tracker.events, self.tracker.ever_learned, fraction, self.active)
                self.active[drop] = False
                self.tracker.reset()
        self._refresh_flops()

    def initial_masks(self) -> None:
        """SparCL's first masks: magnitude top-k of each sparse weight (sum |w| per channel with
        `structure="channel"`). Before this the engine trains with the masks it was exported with."""
        s = self.config.sparcl
        if s is None:
            return
        self.masks_ready = True
        if self.channel_masks is not None:
            self.channel_masks.initial(self.rng)
        else:
            density = 1.0 - s.sparsity
            params = self.engine.parameters()
            self.engine.set_masks({n: initial_mask(params[n], density, self.rng) for n in self.sparse_names})
        self._refresh_flops()

    def update_masks(self) -> None:
        """One TDM update: prune the smallest active weights and regrow by the last gradients
        (`sparcl.prune_and_regrow`, per channel with `structure="channel"`); nothing before a first step."""
        s = self.config.sparcl
        if s is None or not s.tdm or not self.last_grads:
            return
        if self.channel_masks is not None:
            self.channel_masks.update(self.last_grads, s.tdm_schedule.prune_ratio, self.rng)
        else:
            params, masks = self.engine.parameters(), self.engine.masks()
            self.engine.set_masks({
                n: prune_and_regrow(params[n], self.last_grads[n], masks[n], 1.0 - s.sparsity,
                                    s.tdm_schedule.prune_ratio, self.rng)
                for n in self.sparse_names})
        self._refresh_flops()

    def end_task(self) -> None:
        """Replay happens online in `observe`; with latent replay, the prefix freezes after its task."""
        if self.latent is not None and self.task == self.latent.freeze_after:
            self.latent.freeze()
            self._refresh_flops()

    def set_proximal(self, mu: float, anchor: dict[str, np.ndarray] | None) -> None:
        """FedProx: from now on each step minimises loss + mu/2 * ||w - anchor||^2 over the anchored
        trainable weights (mu = 0 or anchor None: off).

        Raises:
            ValueError: mu is not a finite number >= 0. KeyError / ValueError: an anchor that is not
                trainable weights of their shapes (`checks.check_named`).
        """
        if not (_real(mu) and np.isfinite(mu) and mu >= 0):
            raise ValueError(f"proximal mu={mu!r}; accepted: a finite number >= 0")
        if not mu or anchor is None:
            self.proximal = None
            return
        self.proximal = (float(mu), check_named("anchor weight", anchor, self.engine.trainable_shapes))

    # --- one step -----------------------------------------------------------------------
    def observe(self, x: np.ndarray, y: np.ndarray, indices: np.ndarray | None = None) -> float:
        """One optimizer step on a stream batch (rows `indices` of the current task) plus replay.

        `indices` is needed only by DDR (it counts forgetting events per example of the task); a
        batch of 0 rows is a replay-only step.

        Returns:
            the loss before the step.
        """
        if self.task < 0:
            raise ValueError("observe before begin_task: call begin_task(task, n_examples) first (the task id the "
                             "buffer records); an app without tasks uses edgecl.runtime.open_learner")
        if self.config.sparcl is not None and self.step == 0 and not self.masks_ready:
            warnings.warn(f"{self.config.label}: the first step runs before SparCL's first masks, so it trains "
                          "dense; call begin_epoch(0, epochs) at task 0 (or initial_masks()) first", RuntimeWarning,
                          stacklevel=2)
        if self.tracker is not None and indices is None:
            raise ValueError("DDR counts forgetting per example of the task: pass indices (the rows of x in the task)")
        n = len(x)
        c = self.config
        encode_flops = self.latent.encode_flops_per_sample * n if self.latent is not None else 0.0
        if self.latent is not None:  # what the active engine trains on and the buffer stores
            x = self.latent.encode(x)
        xs, ys, sw, tl, lw = [x], [y], [np.full(n, 1.0 / max(n, 1), np.float32)], [np.zeros((n, self.k), np.float32)], [
            np.zeros(n, np.float32)]
        if c.uses_buffer and len(self.buffer) > 0:
            m = min(c.replay_batch, len(self.buffer))
            if c.method is Method.ER:
                bx, by, _, _, _ = self.buffer.sample(m)
                total = n + m
                sw = [np.full(n, 1.0 / total, np.float32), np.full(m, 1.0 / total, np.float32)]
                xs.append(bx)
                ys.append(by)
                tl.append(np.zeros((m, self.k), np.float32))
                lw.append(np.zeros(m, np.float32))
            else:
                bx1, by1, bl1, _, _ = self.buffer.sample(m)
                bx2, by2, _, _, _ = self.buffer.sample(m)
                xs += [bx1, bx2]
                ys += [by1, by2]
                sw += [np.zeros(m, np.float32), np.full(m, c.beta / m, np.float32)]
                tl += [bl1, np.zeros((m, self.k), np.float32)]
                lw += [np.full(m, c.alpha / m, np.float32), np.zeros(m, np.float32)]
        batch_x = np.concatenate(xs) if len(xs) > 1 else x
        batch_y = np.concatenate(ys) if len(ys) > 1 else y
        loss, grads = self.engine.loss_and_grads(batch_x, batch_y, np.concatenate(sw), np.concatenate(tl),
                                                 np.concatenate(lw))
        stream_logits = self.engine.last_logits[:n]
        if self.proximal is not None:
            mu, anchor = self.proximal
            params = self.engine.parameters()
            grads = {name: (g + np.float32(mu) * (params[name] - anchor[name]) if name in anchor else g)
                     for name, g in grads.items()}
        if self.sparse_names:
            self.last_grads = {name: grads[name] for name in self.sparse_names}
        if self.dgm is not None:
            grads = self.dgm.apply(self.step, grads)
            if self.dgm.recomputed:  # every `every` steps, and at a task's first step (masks reset)
                self._refresh_flops()  # new gradient masks: new weight-gradient densities
        self.engine.apply_gradients(grads)
        if self.tracker is not None:
            self.tracker.update(indices, stream_logits.argmax(1) == y)
        if c.uses_buffer:
            self.buffer.add(x, y, stream_logits.astype(np.float32) if self.buffer.store_logits else None,
                            task=self.task)
        self.step += 1
        samples = len(batch_x)
        self.train_flops += samples * self._flops_per_sample + encode_flops
        self.dense_train_flops += samples * self._dense_flops_per_sample + encode_flops
        return loss

    @property
    def k(self) -> int:
        return self.engine.manifest.num_classes

    def _sparcl_on(self, switch: str) -> bool:
        return self.config.sparcl is not None and getattr(self.config.sparcl, switch)

    def _refresh_flops(self) -> None:
        """FLOPs per sample under the current weight and gradient densities (SparCL's counting).

        A weight-gradient entry is work only where the weight is active and DGM keeps it: the
        mask multiplies the weight inside the graph, so a masked entry's gradient is exactly 0
        and need not be computed. Its density is measured on the current masks (both), or is
        min(weight density, DGM density) before the first gradient mask exists; without DGM
        it is the weight density.
        """
        self.layers = self.engine.manifest.extra.get("layers", [])  # the suffix's, once latent replay froze
        if not self.layers:
            self._flops_per_sample = self._dense_flops_per_sample = 0.0
            return
        frozen = {p.name for p in self.engine.manifest.parameters if not p.trainable}
        frozen &= {row["weight"] for row in self.layers}
        self._dense_flops_per_sample = dense_training_flops(self.layers, 1, frozen).total
        if self.channel_masks is not None:  # what the narrower graph computes; DGM saves no product there
            computed = self.channel_masks.computed_densities()
            self._flops_per_sample = training_flops(self.layers, 1, computed, computed, frozen).total
            return
        masks = self.engine.masks()
        weight_density = {n: float(masks[n].mean()) for n in self.sparse_names}
        grad_density = dict(weight_density)  # without DGM: every active entry
        if self.dgm is not None:
            grad_density = {n: (float(np.mean((masks[n] != 0) & (self.dgm.masks[n] != 0))) if n in self.dgm.masks
                                else min(weight_density[n], self.dgm.density)) for n in self.sparse_names}
        self._flops_per_sample = training_flops(self.layers, 1, weight_density, grad_density, frozen).total

    # --- checkpoints ----------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        """Learner state for a checkpoint (the engine and buffer save their own)."""
        meta = {"task": self.task, "step": self.step, "masks_ready": self.masks_ready, "train_flops": self.train_flops,
                "dense_train_flops": self.dense_train_flops, "rng": self.rng.bit_generator.state}
        out = {"learner::meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
        if self.active is not None:
            out["learner::active"] = self.active
        if self.tracker is not None:
            for name in ("last_correct", "events", "ever_learned", "presentations"):
                out[f"learner::tracker::{name}"] = getattr(self.tracker, name)
        for name, g in self.last_grads.items():
            out[f"learner::last_grad::{name}"] = g
        if self.dgm is not None:
            for name, m in self.dgm.masks.items():
                out[f"learner::dgm::{name}"] = m
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        meta = json.loads(arrays["learner::meta"].tobytes().decode())
        self.task, self.step = meta["task"], meta["step"]
        # saved before this key existed: a step was taken, so SparCL's first masks were set before it
        self.masks_ready = bool(meta.get("masks_ready", self.step > 0))
        self.train_flops, self.dense_train_flops = meta["train_flops"], meta["dense_train_flops"]
        self.rng.bit_generator.state = meta["rng"]
        self.active = arrays.get("learner::active")
        if "learner::tracker::events" in arrays:
            self.tracker = ForgettingTracker(len(arrays["learner::tracker::events"]))
            for name in ("last_correct", "events", "ever_learned", "presentations"):
                setattr(self.tracker, name, arrays[f"learner::tracker::{name}"].copy())
        self.last_grads = {k.split("::", 2)[2]: v for k, v in arrays.items() if k.startswith("learner::last_grad::")}
        if self.dgm is not None:
            self.dgm.masks = {k.split("::", 2)[2]: v for k, v in arrays.items() if k.startswith("learner::dgm::")}
        self._refresh_flops()
