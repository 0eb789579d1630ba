"""Optimizers in numpy that follow torch's update formulas exactly (torch.optim.SGD, AdamW).

The portable engine computes gradients in ONNX and updates weights here, so the same
code runs on any board that has numpy.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from enum import Enum

import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)
# float32's spacing at its maximum is 2^104: a result beyond the maximum by less than half of it
# (2^103) rounds back to the maximum, so a finite weight moved by less than this stays finite
# (half of 2^103 again: room for the rounding of lr * direction).
SAFE_STEP = 2.0**102


def check_learning_rate(lr, name: str = "lr") -> float:
    """`lr` as a float if it is a real number in [0, float32's maximum]; the engines compute in float32.

    What `Engine.set_learning_rate` accepts (a schedule may go anywhere float32 holds; the update
    check refuses a step that would overflow). A run's configuration (`OptimizerConfig`,
    `LearnerSpec`) accepts at most MAX_LR.

    Raises:
        ValueError: naming `name`, the value and what is accepted.
    """
    real = isinstance(lr, (int, float, np.integer, np.floating)) and not isinstance(lr, (bool, np.bool_))
    if not (real and math.isfinite(lr) and 0 <= lr <= FLOAT32_MAX):
        raise ValueError(f"{name}={lr!r}; accepted: a finite number >= 0 (at most {FLOAT32_MAX:.4g}, "
                         f"float32's maximum)")
    return float(lr)


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

    def state_specs(self, shapes: dict[str, tuple], steps: int) -> dict[str, tuple[tuple, np.dtype]]:
        """Key -> (shape, dtype) of every array `state_arrays` holds after `steps` steps over all of `shapes`."""
        if steps == 0:
            return {}
        if self.config.kind is OptimizerKind.SGD:
            slots = {"momentum": None} if self.config.momentum else {}
        else:
            slots = {"exp_avg": None, "exp_avg_sq": None, "step": ((), np.dtype(np.int64))}
        return {f"optim::{slot}::{name}": spec or (shape, np.dtype(np.float32))
                for name, shape in shapes.items() for slot, spec in slots.items()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.state = {}
        for key, val in arrays.items():
            _, slot, name = key.split("::", 2)
            val = np.array(val)
            self.state.setdefault(name, {})[slot] = int(val) if slot == "step" else val


def adamw_ratio_bound(betas: tuple[float, float], step: int) -> float:
    """An upper bound on |m_hat| / sqrt(v_hat) at AdamW step `step` (1 for the first), whatever the gradients.

    With m_t = (1-b1) sum_i b1^(t-i) g_i and v_t = (1-b2) sum_i b2^(t-i) g_i^2 (zero moments at
    the start), Cauchy-Schwarz gives |m_t| <= (1-b1) sqrt(S_t) sqrt(v_t / (1-b2)) with
    S_t = sum_{k<t} (b1^2/b2)^k; the bias corrections 1 - b1^t and sqrt(1 - b2^t) give the rest.
    It is 1 at the first step and 7.3 at most for betas (0.9, 0.999). Returns inf for b2 = 0.
    """
    b1, b2 = betas
    if b2 == 0:
        return math.inf
    r = b1 * b1 / b2
    s = step if r == 1 else (1 - r**step) / (1 - r)
    return (1 - b1) / (1 - b1**step) * math.sqrt(s * (1 - b2**step) / (1 - b2))


def update_bound(config: OptimizerConfig, lr: float, step: int, g_max: float, w_max: float | None = None,
                 momentum_max: float | None = None, exp_avg_max: float | None = None) -> float:
    """An upper bound on |w| after one optimizer step of one tensor and on each new term the step computes.

    From the largest |g| of the tensor, and the largest |w|, |momentum buffer| (SGD) or |exp_avg|
    (AdamW) where the engine read them (None: not read, or not there yet). The new terms are
    g + wd * w, the momentum buffer, lr * direction, g^2, ...; AdamW's moments are convex
    combinations of their finite old values and g, g^2. So below float32's maximum, the step
    cannot overflow. AdamW's |m_hat| / (sqrt(v_hat) + eps) is bounded by `adamw_ratio_bound`, so
    an engine whose moments are hidden (onnxruntime-training) is covered too. The formulas are
    those of `NumpyOptimizer.step` (torch's).

    Without w_max the weights are only known to be finite float32: a step that does not scale them
    up and moves them by less than SAFE_STEP keeps them finite; any other step gets an infinite
    bound (then pass w_max). Reading no weights keeps the check cheap: it runs every step.

    Args:
        step: the index of this step, 1 for the first.
    """
    c = config
    if c.kind is OptimizerKind.SGD:
        g = g_max + c.weight_decay * (FLOAT32_MAX if w_max is None else w_max)
        if not c.momentum:
            d = buf = g
        else:
            buf = g if momentum_max is None else c.momentum * momentum_max + (1 - c.dampening) * g
            d = g + c.momentum * buf if c.nesterov else buf
        scale, move, terms = 1.0, lr * d, (g, buf, d)
    else:
        b1, b2 = c.betas
        ratio = adamw_ratio_bound(c.betas, step)
        if exp_avg_max is None and step == 1:
            exp_avg_max = 0.0  # the moments start at zero
        if exp_avg_max is not None:  # |m_hat| / eps: finite whatever b2
            ratio = min(ratio, (b1 * exp_avg_max + (1 - b1) * g_max) / (1 - b1**step) / c.eps)
        scale, move = abs(1 - lr * c.weight_decay), lr * ratio if lr else 0.0  # not 0 * inf
        terms = (g_max * g_max, g_max / math.sqrt(1 - b2**step), lr / (1 - b1**step))
    if w_max is None:
        new_w = 0.0 if scale <= 1 and move < SAFE_STEP else math.inf
    else:
        new_w = w_max * scale + move
    return max(*terms, move, new_w)
