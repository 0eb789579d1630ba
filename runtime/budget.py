"""Memory planner: what a training run holds, in bytes, and how much replay buffer the rest buys.

One budget covers parameters, gradients, optimizer state, masks, BatchNorm running
statistics, the activations of one training step and the replay buffer (SparCL, Wang et
al., NeurIPS 2022, sets the buffer size in examples; on a device the limit is bytes). The
plan counts the training state only: the interpreter, numpy and ONNX Runtime themselves
are not in it; `peak_rss_bytes` measures what the process really used.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from pathlib import Path

import numpy as np

from .buffer import bytes_per_example
from .sizes import UNITS, parse_bytes  # noqa: F401  (public here too)
from .errors import ArtifactError
from .manifest import Manifest, TensorSpec
from .memory import human_bytes
from .optim import OptimizerConfig, OptimizerKind

# Masks live on the device as float32 arrays (the engines multiply weights by them).
MASK_ITEMSIZE = 4
ACTIVATION_KEY = "activation_bytes_per_sample"
FLOAT32_BYTES = 4
# MemoryPlan field -> its line in the breakdowns (the plan's table and the refusal message).
LABELS = {
    "parameters_bytes": "parameters",
    "gradients_bytes": "gradients",
    "optimizer_bytes": "optimizer state",
    "masks_bytes": "masks",
    "batchnorm_bytes": "batchnorm statistics",
    "activations_bytes": "activations",
}


def optimizer_slots(optimizer: OptimizerConfig | OptimizerKind | str) -> int:
    """Arrays of optimizer state per trainable parameter: SGD 0, SGD with momentum 1, AdamW 2.

    Args:
        optimizer: an OptimizerConfig, or a kind ("sgd" means SGD without momentum).
    Raises:
        ValueError: an unknown optimizer kind.
    """
    config = optimizer if isinstance(optimizer, OptimizerConfig) else OptimizerConfig(kind=optimizer)
    if config.kind is OptimizerKind.ADAMW:
        return 2  # exp_avg, exp_avg_sq
    return 1 if config.momentum else 0


def tensor_bytes(spec: TensorSpec) -> int:
    """Bytes of one tensor of the manifest (shape x dtype size)."""
    return math.prod(spec.shape) * np.dtype(spec.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes of every part of a training run under one budget, and the replay buffer that fits.

    Attributes:
        budget_bytes: the budget the plan was made for.
        batch_size, replay_batch_size: examples per step from the stream and from the buffer.
        parameters_bytes: every parameter, trainable or frozen.
        gradients_bytes: one gradient per trainable parameter.
        optimizer_bytes: optimizer state (momentum or AdamW moments) per trainable parameter.
        masks_bytes: one float32 mask per masked parameter.
        batchnorm_bytes: BatchNorm running statistics (the manifest's buffers).
        activations_bytes: intermediate tensors of one forward+backward step over
            batch_size + replay_batch_size examples.
        replay_example_bytes: bytes of one buffered example (input, label, logits, task id).
        replay_capacity: examples the replay buffer holds (the most that fit).
    Raises:
        ValueError: a negative count, or parts that add up to more than the budget.
    """

    budget_bytes: int
    batch_size: int
    replay_batch_size: int
    parameters_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    masks_bytes: int
    batchnorm_bytes: int
    activations_bytes: int
    replay_example_bytes: int
    replay_capacity: int

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"MemoryPlan.{f.name}={value!r}; accepted: an integer >= 0")
            object.__setattr__(self, f.name, int(value))
        if self.replay_example_bytes < 1:
            raise ValueError(f"MemoryPlan.replay_example_bytes={self.replay_example_bytes}; accepted: >= 1")
        if self.total_bytes > self.budget_bytes:
            raise ValueError(f"MemoryPlan parts add up to {self.total_bytes} bytes, over budget_bytes="
                             f"{self.budget_bytes}")

    @property
    def model_bytes(self) -> int:
        """Parameters + gradients + optimizer state + masks + BatchNorm statistics."""
        return (self.parameters_bytes + self.gradients_bytes + self.optimizer_bytes + self.masks_bytes
                + self.batchnorm_bytes)

    @property
    def replay_bytes(self) -> int:
        return self.replay_capacity * self.replay_example_bytes

    @property
    def total_bytes(self) -> int:
        return self.model_bytes + self.activations_bytes + self.replay_bytes

    @property
    def unused_bytes(self) -> int:
        """Budget left over: less than one replay example."""
        return self.budget_bytes - self.total_bytes

    def rows(self) -> list[tuple[str, int]]:
        """(part, bytes) in the order of `table`, ending with the total and the unused rest."""
        rows = [(label, getattr(self, field)) for field, label in LABELS.items()]
        rows[-1] = (f"activations ({self.batch_size} + {self.replay_batch_size} examples)", self.activations_bytes)
        return rows + [
            (f"replay buffer ({self.replay_capacity} x {self.replay_example_bytes} B)", self.replay_bytes),
            ("total", self.total_bytes),
            ("unused", self.unused_bytes),
        ]

    def table(self) -> str:
        """A human-readable breakdown: one line per part, bytes and a binary-unit size."""
        return format_rows(f"memory plan for a budget of {format_bytes(self.budget_bytes)}", self.rows())

    def to_dict(self) -> dict:
        """The fields, plus the derived model, replay, total and unused bytes."""
        d = dataclasses.asdict(self)
        d.update(model_bytes=self.model_bytes, replay_bytes=self.replay_bytes, total_bytes=self.total_bytes,
                 unused_bytes=self.unused_bytes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MemoryPlan:
        """Inverse of `to_dict` (derived keys are ignored)."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def plan_memory(manifest: Manifest, budget_bytes: int | str, batch_size: int,
                optimizer: OptimizerConfig | OptimizerKind | str, replay_batch_size: int = 0,
                store_logits: bool = True, sample_shape: tuple[int, ...] | None = None) -> MemoryPlan:
    """Fit a training run into `budget_bytes` and give the rest to the replay buffer.

    The fixed part is parameters + gradients (trainable only) + optimizer state + float32
    masks + BatchNorm statistics + activations of (batch_size + replay_batch_size) examples,
    from `manifest.extra["activation_bytes_per_sample"]` recorded at export. A latent-replay export's frozen prefix
    (manifest extra["latent"]) adds its weights and BatchNorm statistics, without gradients or optimizer state. With replay
    (replay_batch_size > 0) the buffer must hold at least one replay batch.

    Args:
        manifest: the model's manifest.
        budget_bytes: total bytes, or a size string such as "4MiB" (see parse_bytes).
        batch_size: stream examples per step (>= 1).
        optimizer: an OptimizerConfig, or a kind ("sgd" means SGD without momentum).
        replay_batch_size: buffer examples per step, all replay terms together (DER++
            draws two batches: pass their sum).
        store_logits: whether the buffer keeps logits (DER++: True; ER: False).
        sample_shape: the shape of one stored input (None: the manifest's input_shape); latent
            replay stores latents: pass the latent shape (the largest of what the buffer ever holds).
    Returns:
        MemoryPlan with replay_capacity the largest number of examples that fits.
    Raises:
        ValueError: bad arguments, or a budget below what the run needs (the message gives
            the bytes needed and their breakdown).
        ArtifactError: the manifest has no activation size (artifacts from an older export).
    """
    budget_bytes = parse_bytes(budget_bytes)
    for name, value, low in (("batch_size", batch_size, 1), ("replay_batch_size", replay_batch_size, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name}={value!r}; accepted: an integer >= {low}")
    per_sample = manifest.extra.get(ACTIVATION_KEY)
    if per_sample is None:
        raise ArtifactError(f"manifest of {manifest.model_name or 'this model'!r} has no extra[{ACTIVATION_KEY!r}], "
                            "so activation memory cannot be planned; export the model again with "
                            "edgecl.exporters.export, which records it")
    if isinstance(per_sample, bool) or not isinstance(per_sample, (int, np.integer)) or per_sample < 0:
        raise ArtifactError(f"manifest extra[{ACTIVATION_KEY!r}] = {per_sample!r}; accepted: an integer >= 0 "
                            "(bytes); export the model again")
    trainable = [p for p in manifest.parameters if p.trainable]
    grads = sum(tensor_bytes(p) for p in trainable)
    # a latent-replay export's manifest lists the suffix; its frozen prefix's weights and statistics are held too
    prefix = manifest.extra.get("latent", {})
    prefix_params = sum(math.prod(s) for s in prefix.get("prefix_parameters", {}).values()) * FLOAT32_BYTES
    prefix_buffers = sum(math.prod(s) for s in prefix.get("prefix_buffers", {}).values()) * FLOAT32_BYTES
    parts = dict(
        parameters_bytes=sum(tensor_bytes(p) for p in manifest.parameters) + prefix_params,
        gradients_bytes=grads,
        optimizer_bytes=optimizer_slots(optimizer) * grads,
        masks_bytes=sum(math.prod(p.shape) * MASK_ITEMSIZE for p in manifest.parameters if p.masked),
        batchnorm_bytes=sum(tensor_bytes(b) for b in manifest.buffers) + prefix_buffers,
        activations_bytes=int(per_sample) * (batch_size + replay_batch_size),
    )
    example = bytes_per_example(manifest.input_shape if sample_shape is None else sample_shape, manifest.num_classes,
                                store_logits)
    needed = sum(parts.values()) + replay_batch_size * example
    if budget_bytes < needed:
        rows = [(LABELS[k], v) for k, v in parts.items()]
        if replay_batch_size:
            rows.append((f"replay buffer, one replay batch ({replay_batch_size} x {example} B)",
                         replay_batch_size * example))
        rows.append(("needed", needed))
        raise ValueError(f"a budget of {budget_bytes} bytes ({human_bytes(budget_bytes)}) is too small: this run "
                         f"needs at least {needed} bytes ({human_bytes(needed)}); lower batch_size or replay_batch_size, "
                         "or raise the budget\n" + format_rows("breakdown:", rows))
    return MemoryPlan(budget_bytes=budget_bytes, batch_size=int(batch_size),
                      replay_batch_size=int(replay_batch_size), replay_example_bytes=example,
                      replay_capacity=(budget_bytes - sum(parts.values())) // example, **parts)


def format_bytes(n: int) -> str:
    """'4 194 304 B (4.00 MiB)'-style text: exact bytes, then the nearest binary unit from KiB up."""
    exact = f"{n:,}".replace(",", " ") + " B"
    human = human_bytes(n)
    return exact if human.endswith(" B") else f"{exact} ({human})"


def format_rows(title: str, rows: list[tuple[str, int]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join([title] + [f"  {name:<{width}}  {format_bytes(value)}" for name, value in rows])


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process in bytes (Linux VmHWM, else getrusage), None if unknown."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource
    except ImportError:  # Windows
        return None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and the BSDs, in bytes on macOS.
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


def current_rss_bytes() -> int | None:
    """Current resident set size of this process in bytes (Linux VmRSS), None where /proc is absent."""
    return _proc_status_bytes("VmRSS")


def _proc_status_bytes(field: str, path: str | Path = "/proc/self/status") -> int | None:
    """A 'Field:   1234 kB' line of /proc/<pid>/status in bytes, None if the file or field is absent."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    match = re.search(rf"^{re.escape(field)}:\s*(\d+)\s*kB\s*$", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None
