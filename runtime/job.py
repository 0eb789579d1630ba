"""The learner of a continual-learning run, as one spec: shared by `edgecl run` and the board agent.

`LearnerSpec` holds what both sides choose the same way (strategy, SparCL switches, replay
buffer by count or memory budget, schedule); `build_learner` turns it into a `Learner` over an
engine. The host's `JobConfig` (bench/cl_run.py) adds data, model and engine; the agent's
`TrainSpec` (devices/jobs.py) adds run id, artifact and board data. Imports numpy and the
runtime only, so the agent can use it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .budget import MemoryPlan, plan_memory
from .buffer import ReplayBuffer, bytes_per_example
from .loop import RunConfig
from .optim import OptimizerConfig
from .scenarios import Scenario
from .strategies import Learner, Method, SparCLConfig, StrategyConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class LearnerSpec:
    """Strategy, replay buffer and schedule of a run.

    Args:
        method: finetune, joint, er or derpp. sparsity: SparCL weight sparsity, None for a
            dense strategy. tdm / dgm / ddr: SparCL's three parts, each switchable.
        buffer: replay examples (None: what `budget` leaves). budget: memory budget in bytes or
            with a KiB/MiB/GiB suffix, e.g. "4MiB" (None: no plan).
        epochs (per task), batch_size, lr (SGD), seed, threads (ONNX Runtime intra-op; None:
        its default), checkpoint_every: steps between checkpoints (0: task ends only).

    Raises:
        ValueError: an unknown method, SparCL on fine-tuning or joint, a replay strategy with
            neither buffer nor budget, buffer < 1, lr <= 0, or a bad schedule.
    """

    method: str = "derpp"
    sparsity: float | None = 0.75
    tdm: bool = True
    dgm: bool = True
    ddr: bool = True
    buffer: int | None = 500
    budget: str | None = None
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.03
    seed: int = 0
    threads: int | None = 2
    checkpoint_every: int = 0

    def __post_init__(self):
        strategy = self.strategy()  # validates method and sparsity
        if self.sparsity is not None and not strategy.uses_buffer:
            raise ValueError(f"SparCL (sparsity={self.sparsity}) runs on er or derpp, not {self.method!r}; "
                             "use a dense strategy (sparsity None, --dense) for fine-tuning and joint training")
        if self.buffer is not None and (isinstance(self.buffer, bool) or not isinstance(self.buffer, int)
                                        or self.buffer < 1):
            raise ValueError(f"buffer={self.buffer!r}; accepted: an integer >= 1 (examples), or None with a budget")
        if self.buffer is None and self.budget is None and strategy.uses_buffer:
            raise ValueError(f"method {self.method!r} replays examples: give a buffer (examples, --buffer N) "
                             "or a memory budget (--budget BYTES)")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads={self.threads!r}; accepted: an integer >= 1, or None (ONNX Runtime decides)")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r}; accepted: > 0")
        self.run_config()

    def strategy(self) -> StrategyConfig:
        sparcl = None if self.sparsity is None else SparCLConfig(self.sparsity, self.tdm, self.dgm, self.ddr)
        return StrategyConfig(self.method, replay_batch=self.batch_size, sparcl=sparcl)

    def run_config(self) -> RunConfig:
        return RunConfig(self.epochs, self.batch_size, self.seed, self.checkpoint_every)

    def optimizer(self) -> OptimizerConfig:
        return OptimizerConfig("sgd", lr=self.lr)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_learner(engine, scenario: Scenario, spec: LearnerSpec,
                  learner_cls=Learner) -> tuple[Learner, dict, MemoryPlan | None]:
    """The learner of `spec` over `engine`, with its buffer sized by count or by the budget's plan.

    Returns:
        (learner, the buffer / plan as a dict for the run's JSON, the MemoryPlan or None
        when no budget was given).

    Raises:
        ValueError: the budget cannot hold the model (the message gives the bytes needed), or the
            asked buffer does not fit what the budget leaves (the plan is in the message).
    """
    strategy = spec.strategy()
    derpp = strategy.method is Method.DERPP
    capacity = spec.buffer if strategy.uses_buffer else 0
    plan = None
    if spec.budget is not None:
        replay = (2 if derpp else 1) * spec.batch_size if strategy.uses_buffer else 0
        plan = plan_memory(engine.manifest, spec.budget, spec.batch_size, engine.optimizer_config,
                           replay_batch_size=replay, store_logits=derpp)
        if strategy.uses_buffer:
            if spec.buffer is None:
                capacity = plan.replay_capacity
            elif spec.buffer > plan.replay_capacity:
                raise ValueError(f"buffer={spec.buffer} examples does not fit the budget {spec.budget}: it leaves "
                                 f"room for {plan.replay_capacity} ({plan.replay_example_bytes} B each)\n"
                                 f"{plan.table()}")
    buffer = (ReplayBuffer(capacity, scenario.input_shape, scenario.num_classes,
                           np.random.default_rng([spec.seed, 1]), store_logits=derpp)
              if strategy.uses_buffer else None)
    learner = learner_cls(engine, strategy, buffer, np.random.default_rng(spec.seed))
    plan_dict = plan.to_dict() if plan is not None else {
        "buffer_examples": capacity,
        "buffer_bytes": capacity * bytes_per_example(scenario.input_shape, scenario.num_classes, derpp)}
    return learner, plan_dict, plan
