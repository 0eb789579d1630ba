"""The learner of a continual-learning run, as one spec: shared by `edgecl run` and the board agent.

`LearnerSpec` holds what both sides choose the same way (strategy, SparCL switches, replay
buffer by count or memory budget, schedule); `build_learner` turns it into a `Learner` over an
engine. The host's `JobConfig` (bench/cl_run.py) adds data, model and engine; the agent's
`TrainSpec` (devices/jobs.py) adds run id, artifact and board data. Imports numpy and the
runtime only, so the agent can use it.
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from .budget import MemoryPlan, parse_bytes, plan_memory
from .buffer import ReplayBuffer, bytes_per_example
from .channel_sparcl import STRUCTURES
from .latent import LatentReplay
from .loop import RunConfig
from .memory import MachineMemory, check_fits, machine_memory
from .optim import MAX_LR, OptimizerConfig
from .scenarios import Scenario
from .strategies import Learner, Method, SparCLConfig, StrategyConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class LearnerSpec:
    """Strategy, replay buffer and schedule of a run.

    Args:
        method: finetune, joint, er or derpp. sparsity: SparCL weight sparsity, None for a
            dense strategy. tdm / dgm / ddr: SparCL's three parts, each switchable. structure:
            "weight" (SparCL's masks on weight entries) or "channel" (whole output channels, on a
            channel-structured export: `edgecl.runtime.channel_sparcl`).
        buffer: replay examples (None: what `budget` leaves). budget: memory budget in bytes or
            with a KiB/MiB/GiB suffix, e.g. "4MiB" (None: no plan).
        epochs (per task), batch_size, lr (SGD), seed, threads (ONNX Runtime intra-op; None:
        its default), checkpoint_every: steps between checkpoints (0: task ends only).

    Raises:
        ValueError: an unknown method, SparCL on fine-tuning or joint, a SparCL part switched off
            without SparCL, a replay strategy with neither buffer nor budget, buffer < 1, a budget
            that is not a size, lr outside (0, MAX_LR], or a bad schedule. Whether the buffer and
            budget fit the machine is `check_memory`'s question, asked where the run allocates.
    """

    method: str = "derpp"
    sparsity: float | None = 0.75
    tdm: bool = True
    dgm: bool = True
    ddr: bool = True
    structure: str = "weight"
    buffer: int | None = 500
    budget: str | None = None
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.03
    seed: int = 0
    threads: int | None = 2
    checkpoint_every: int = 0

    def __post_init__(self):
        self.run_config()  # epochs, batch_size, seed, checkpoint_every; batch_size first: it is the replay batch too
        for name in ("tdm", "dgm", "ddr"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}; accepted: True or False")
            if self.sparsity is None and not getattr(self, name):
                raise ValueError(f"{name}=False with sparsity=None: {name.upper()} is a part of SparCL, which a "
                                 "dense strategy does not run; accepted: a sparsity (SparCL) or tdm, dgm, ddr True")
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure={self.structure!r}; accepted: {', '.join(STRUCTURES)}")
        if self.structure != "weight" and self.sparsity is None:
            raise ValueError(f"structure={self.structure!r} with sparsity=None: the structure is SparCL's, which a "
                             "dense strategy does not run; accepted: a sparsity (SparCL), or structure='weight'")
        strategy = self.strategy()  # validates method and sparsity
        if self.sparsity is not None and not strategy.uses_buffer:
            raise ValueError(f"SparCL (sparsity={self.sparsity}) runs on er or derpp, not {self.method!r}; "
                             "use a dense strategy (sparsity None, --dense) for fine-tuning and joint training")
        if self.buffer is not None and (isinstance(self.buffer, bool) or not isinstance(self.buffer, int)
                                        or self.buffer < 1):
            raise ValueError(f"buffer={self.buffer!r}; accepted: an integer >= 1 (examples), or None with a budget")
        if self.budget is not None:
            try:
                parse_bytes(self.budget)
            except ValueError as e:
                raise ValueError(f"budget={self.budget!r}: {e}") from None
        if self.buffer is None and self.budget is None and strategy.uses_buffer:
            raise ValueError(f"method {self.method!r} replays examples: give a buffer (examples, --buffer N) "
                             "or a memory budget (--budget BYTES)")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads={self.threads!r}; accepted: an integer >= 1, or None (ONNX Runtime decides)")
        if not (isinstance(self.lr, numbers.Real) and not isinstance(self.lr, bool) and 0 < self.lr <= MAX_LR):
            raise ValueError(f"lr={self.lr!r}; accepted: > 0 and <= {MAX_LR:g} (SGD's learning rate)")

    def strategy(self) -> StrategyConfig:
        sparcl = None if self.sparsity is None else SparCLConfig(self.sparsity, self.tdm, self.dgm, self.ddr,
                                                                    structure=self.structure)
        return StrategyConfig(self.method, replay_batch=self.batch_size, sparcl=sparcl)

    def run_config(self) -> RunConfig:
        return RunConfig(self.epochs, self.batch_size, self.seed, self.checkpoint_every)

    def optimizer(self) -> OptimizerConfig:
        return OptimizerConfig("sgd", lr=self.lr)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_memory(spec: LearnerSpec, sample_shape: tuple[int, ...], num_classes: int,
                 memory: MachineMemory | None = None) -> None:
    """Refuse a budget or a replay buffer larger than this machine's available memory, before anything
    is allocated (or, on the host, exported).

    A budget beyond it is refused, not warned about: the budget sizes the preallocated buffer, so
    such a run fails to allocate or is killed when the buffer fills; and with a buffer given, the
    budget is a promise that the run fits the device, which it cannot keep.

    Args:
        spec: the learner. sample_shape, num_classes: of the data (they size one buffered example).
        memory: the machine's memory (default: `machine_memory()`; the agent passes nothing and
            so checks its own machine).
    Raises:
        ValueError: naming the budget or buffer, its bytes, the machine's memory and what is accepted.
    """
    memory = machine_memory() if memory is None else memory
    strategy = spec.strategy()
    if spec.budget is not None:
        check_fits(f"budget={spec.budget!r}", parse_bytes(spec.budget), "budget", memory=memory)
    if spec.buffer is not None and strategy.uses_buffer:
        per_example = bytes_per_example(sample_shape, num_classes, strategy.method is Method.DERPP)
        check_fits(f"buffer={spec.buffer} examples ({per_example} B each)", spec.buffer * per_example, "buffer",
                   per_example, "examples", memory)


def build_learner(engine, scenario: Scenario, spec: LearnerSpec,
                  learner_cls=Learner) -> tuple[Learner, dict, MemoryPlan | None]:
    """The learner of `spec` over `engine`, with its buffer sized by count or by the budget's plan.

    Returns:
        (learner, the buffer / plan as a dict for the run's JSON, the MemoryPlan or None
        when no budget was given).

    Raises:
        ValueError: the budget cannot hold the model (the message gives the bytes needed), the
            asked buffer does not fit what the budget leaves (the plan is in the message), or the
            buffer or budget is larger than this machine's memory (`check_memory`).
    """
    check_memory(spec, scenario.input_shape, scenario.num_classes)
    strategy = spec.strategy()
    derpp = strategy.method is Method.DERPP
    capacity = spec.buffer if strategy.uses_buffer else 0
    plan = None
    latent = engine if isinstance(engine, LatentReplay) else None
    # latent replay: the buffer holds raw inputs until the freeze, latents after; its capacity is planned for latents
    stored_shape = scenario.input_shape if latent is None else latent.prefix.latent_shape
    if spec.budget is not None:
        replay = (2 if derpp else 1) * spec.batch_size if strategy.uses_buffer else 0
        plan = plan_memory(engine.manifest, spec.budget, spec.batch_size, engine.optimizer_config,
                           replay_batch_size=replay, store_logits=derpp, sample_shape=stored_shape)
        if strategy.uses_buffer:
            if spec.buffer is None:
                capacity = plan.replay_capacity
            elif spec.buffer > plan.replay_capacity:
                raise ValueError(f"buffer={spec.buffer} examples does not fit the budget {spec.budget}: it leaves "
                                 f"room for {plan.replay_capacity} ({plan.replay_example_bytes} B each)\n"
                                 f"{plan.table()}")
    buffer = (ReplayBuffer(capacity, scenario.input_shape if latent is None else latent.first_sample_shape,
                           scenario.num_classes, np.random.default_rng([spec.seed, 1]), store_logits=derpp)
              if strategy.uses_buffer else None)
    if latent is not None and buffer is not None:
        latent.attach(buffer)
    learner = learner_cls(engine, strategy, buffer, np.random.default_rng(spec.seed))
    plan_dict = plan.to_dict() if plan is not None else {
        "buffer_examples": capacity,
        "buffer_bytes": capacity * bytes_per_example(stored_shape, scenario.num_classes, derpp)}
    return learner, plan_dict, plan
