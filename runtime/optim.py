"""Optimizers in numpy that follow torch's update formulas exactly (torch.optim.SGD, AdamW).

The portable engine computes gradients in ONNX and updates weights here, so the same
code runs on any board that has numpy.
"""

from __future__ import annotations

import dataclasses
import numbers
from enum import Enum

import numpy as np


# The largest learning rate accepted. Published SGD learning rates stay below it (30 for
# MoCo's linear probe is about the largest); one above it is a typo (1e3 for 1e-3) that would
# blow the weights up to inf within a few steps, mid-run, instead of being refused up front.
MAX_LR = 100.0


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy scalars are numbers.Real


class OptimizerKind(str, Enum):
    SGD = "sgd"
    ADAMW = "adamw"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer choice and hyper-parameters (defaults: SparCL's SGD, lr 0.03, no momentum).

    Raises:
        ValueError: an unknown kind or a hyper-parameter out of range.
    """

    kind: OptimizerKind = OptimizerKind.SGD
    lr: float = 0.03
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        try:
            object.__setattr__(self, "kind", OptimizerKind(self.kind))
        except ValueError:
            raise ValueError(
                f"optimizer kind {self.kind!r} is unknown; accepted: {', '.join(k.value for k in OptimizerKind)}"
            ) from None
        for name, ok, accepted in (
                ("lr", lambda v: 0 <= v <= MAX_LR, f"a finite number in [0, {MAX_LR:g}]"),
                ("momentum", lambda v: 0 <= v < 1, "0 <= momentum < 1"),
                ("dampening", lambda v: 0 <= v <= 1, "0 <= dampening <= 1"),
                ("weight_decay", lambda v: v >= 0, "a finite number >= 0"),
                ("eps", lambda v: v > 0, "a finite number > 0")):
            value = getattr(self, name)
            if not (_is_number(value) and np.isfinite(value) and ok(value)):
                raise ValueError(f"{name}={value!r}; accepted: {accepted}")
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov={self.nesterov!r}; accepted: True or False")
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening == 0 (as in torch.optim.SGD)")
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else ()
        if len(betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas={self.betas!r}; accepted: two numbers in [0, 1)")
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["kind"] = self.kind.value
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> OptimizerConfig:
        return cls(**d)


class NumpyOptimizer:
    """SGD (momentum, dampening, Nesterov, weight decay) or AdamW over named float32 arrays.

    State slots are plain arrays so they can be saved and restored exactly.
    """

    def __init__(self, config: OptimizerConfig):
        self.config = config
        self.lr = config.lr
        self.step_count = 0
        self.state: dict[str, dict[str, np.ndarray]] = {}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        """Update `params[name]` in place for every name in `grads` (torch's formulas)."""
        self.step_count += 1
        c = self.config
        for name, g in grads.items():
            w = params[name]
            slots = self.state.setdefault(name, {})
            if c.kind is OptimizerKind.SGD:
                if c.weight_decay:
                    g = g + c.weight_decay * w
                if c.momentum:
                    buf = slots.get("momentum")
                    if buf is None:
                        buf = slots["momentum"] = g.astype(np.float32, copy=True)
                    else:
                        buf *= c.momentum
                        buf += (1 - c.dampening) * g
                    g = g + c.momentum * buf if c.nesterov else buf
                w -= np.float32(self.lr) * g
            else:
                b1, b2 = c.betas
                if c.weight_decay:
                    w *= np.float32(1 - self.lr * c.weight_decay)
                m = slots.setdefault("exp_avg", np.zeros_like(w))
                v = slots.setdefault("exp_avg_sq", np.zeros_like(w))
                m *= b1
                m += (1 - b1) * g
                v *= b2
                v += (1 - b2) * (g * g)
                t = slots["step"] = slots.get("step", 0) + 1
                bias1 = 1 - b1**t
                bias2_sqrt = np.sqrt(1 - b2**t)
                denom = np.sqrt(v) / np.float32(bias2_sqrt) + np.float32(c.eps)
                w -= np.float32(self.lr / bias1) * (m / denom)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Flat `optim::<slot>::<name>` arrays for a checkpoint."""
        out = {}
        for name, slots in self.state.items():
            for slot, val in slots.items():
                out[f"optim::{slot}::{name}"] = np.asarray(val)
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.state = {}
        for key, val in arrays.items():
            _, slot, name = key.split("::", 2)
            val = np.array(val)
            self.state.setdefault(name, {})[slot] = int(val) if slot == "step" else val
