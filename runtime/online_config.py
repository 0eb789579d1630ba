"""`OnlineConfig`: the settings of an app's online learner, checked up front, and the identity a state folder records."""

from __future__ import annotations

import dataclasses
import numbers
from pathlib import Path

from .errors import ArtifactError
from .manifest import DIGEST_NAME
from .optim import MAX_LR, OptimizerConfig
from .sizes import parse_bytes
from .strategies import SparCLConfig, StrategyConfig

ONLINE_METHODS = ("finetune", "er", "derpp")  # joint training needs every task's data at once: not a stream
STATE_FORMAT = 1
# Settings that may change between two opens of one state folder: they do not change what is learned.
FREE_FIELDS = ("threads",)


def _count(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}; accepted: an integer >= {low}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnlineConfig:
    """What an app's online learner does (`open_learner` takes these as keyword arguments).

    Args:
        method: "finetune", "er" or "derpp" (Buzzega et al., NeurIPS 2020).
        sparsity: SparCL's weight sparsity (Wang et al., NeurIPS 2022) on ER / DER++, None: dense.
        structure: "weight" (masks on weight entries) or "channel" (whole channels, on a
            channel-structured export).
        tdm: task-aware dynamic masking, here on a step schedule: a prune-and-regrow update every
            `tdm_every` steps and at each `end_task`. dgm: dynamic gradient masking (every
            `SparCLConfig.dgm_every` steps, as in `run_scenario`). DDR is not offered: it removes
            examples that stopped being forgotten across a task's repeated epochs, and a stream
            presents each sample once, so it would have nothing to count.
        budget: memory budget (bytes or a size such as "8MiB"); the replay buffer gets what the
            model, its gradients, optimizer state, masks and one step's activations leave.
        buffer: replay examples (None: all the budget leaves); must fit the budget if both given.
        batch_size: most stream samples in one step (a larger `learn` call is split).
        replay_batch: examples drawn from the buffer per step (DER++ draws two such batches).
        replay_steps: replay-only steps after each stream step (0: none).
        lr: SGD learning rate. seed: the generators of masks, buffer and replay sampling.
        threads: ONNX Runtime intra-op threads (None: its default); may change between opens.
    Raises:
        ValueError: naming the bad value and what is accepted.
    """

    method: str = "derpp"
    sparsity: float | None = 0.75
    structure: str = "weight"
    tdm: bool = True
    dgm: bool = True
    tdm_every: int = 250
    budget: str | int | None = "8MiB"
    buffer: int | None = None
    batch_size: int = 32
    replay_batch: int = 32
    replay_steps: int = 0
    lr: float = 0.03
    seed: int = 0
    threads: int | None = None

    def __post_init__(self):
        if self.method not in ONLINE_METHODS:
            extra = " (joint training needs every task's data at once; a stream has none)" if self.method == "joint" else ""
            raise ValueError(f"method={self.method!r}{extra}; accepted: {', '.join(ONLINE_METHODS)}")
        for name in ("tdm", "dgm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}; accepted: True or False")
        if self.sparsity is not None and self.method == "finetune":
            raise ValueError(f"sparsity={self.sparsity!r} with method='finetune': SparCL runs on er or derpp; "
                             "accepted: sparsity=None for fine-tuning")
        for name, low in (("tdm_every", 1), ("batch_size", 1), ("replay_batch", 1), ("replay_steps", 0), ("seed", 0)):
            _count(name, getattr(self, name), low)
        if self.replay_steps and self.method == "finetune":
            raise ValueError(f"replay_steps={self.replay_steps} with method='finetune', which keeps no buffer; "
                             "accepted: replay_steps=0, or method 'er' / 'derpp'")
        if self.seed >= 2**64:
            raise ValueError(f"seed={self.seed}; accepted: an integer in [0, 2**64 - 1]")
        if self.budget is not None:
            try:
                parse_bytes(self.budget)
            except ValueError as e:
                raise ValueError(f"budget={self.budget!r}: {e}") from None
        if self.buffer is not None:
            _count("buffer", self.buffer, 1)
        if self.method != "finetune" and self.buffer is None and self.budget is None:
            raise ValueError(f"method {self.method!r} replays examples: give a budget (e.g. '8MiB') or a buffer size")
        if self.threads is not None:
            _count("threads", self.threads, 1)
        if not (isinstance(self.lr, numbers.Real) and not isinstance(self.lr, bool) and 0 < self.lr <= MAX_LR):
            raise ValueError(f"lr={self.lr!r}; accepted: > 0 and <= {MAX_LR:g} (SGD's learning rate)")
        self.strategy()  # sparsity and structure

    def strategy(self) -> StrategyConfig:
        sparcl = None if self.sparsity is None else SparCLConfig(self.sparsity, self.tdm, self.dgm, ddr=False,
                                                                    structure=self.structure)
        if self.sparsity is None and self.structure != "weight":
            raise ValueError(f"structure={self.structure!r} with sparsity=None: the structure is SparCL's; accepted: "
                             "a sparsity, or structure='weight'")
        return StrategyConfig(self.method, replay_batch=self.replay_batch, sparcl=sparcl)

    def optimizer(self) -> OptimizerConfig:
        return OptimizerConfig("sgd", lr=self.lr)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def state_identity(config: OnlineConfig, artifact_dir: str | Path) -> dict:
    """What a state folder must have been written under to be resumed: the settings (less the free
    ones) and the artifact (the sha256 of its manifest, which lists every file's sha256)."""
    path = Path(artifact_dir) / DIGEST_NAME
    try:
        digest = path.read_text().split()[0]
    except (OSError, IndexError) as e:
        raise ArtifactError(f"{str(path)!r} is unreadable: {e}") from e
    settings = {k: v for k, v in config.to_dict().items() if k not in FREE_FIELDS}
    return {"format": STATE_FORMAT, "config": settings, "artifact_manifest_sha256": digest}
