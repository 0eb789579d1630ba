"""`FleetConfig`: what a federated continual-learning run does, checked up front; the settings each
device receives in its round instructions (`client_settings`)."""

from __future__ import annotations

import dataclasses
import numbers

from edgecl.runtime.online_config import OnlineConfig

from .codec import ENCODINGS

AGGREGATIONS = ("fedavg", "fedprox")
DATASETS = ("digits", "fashion-mnist")
DATA_LR = {"digits": 0.1, "fashion-mnist": 0.03}  # edgecl run's defaults per data set


def _count(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}; accepted: an integer >= {low}")


def _number(name: str, value, low: float, high: float, low_open: bool) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and value <= high
    ok = ok and (value > low if low_open else value >= low)
    if not ok:
        raise ValueError(f"{name}={value!r}; accepted: a number {'>' if low_open else '>='} {low:g} and <= {high:g}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FleetConfig:
    """A fleet run.

    Args:
        clients: devices (Flower SuperNodes), >= 1. rounds: federated rounds; a multiple of `tasks`
            (each task lasts rounds / tasks rounds). data: "digits" or "fashion-mnist".
        tasks: fleet tasks the classes arrive in. alpha: Dirichlet concentration of the split.
        aggregation: "fedavg" (McMahan et al. 2017) or "fedprox" (Li et al. 2020: each device adds
            mu/2 ||w - w_global||^2 to its loss; with local replay, the issue's forgetting-aware baseline).
        mu: FedProx's proximal weight. masked_aggregation: each entry averaged over the devices that
            trained it (False: the ablation, plain FedAvg of sparse devices' zero-filled weights). method: each device's learner ("finetune", "er", "derpp").
        sparsity: SparCL on each device (None: dense); masked aggregation follows from the masks.
        encoding: "dense", "sparse" (mask bits + masked values) or "sparse-q8" (8-bit deltas).
        epochs: local passes over a round's new examples. batch_size, replay_batch, lr: the learner's.
        buffer: replay examples per device. fraction: share of devices sampled per round.
        round_timeout_s: replies later than this are dropped (stragglers). seed: data split, model,
            devices' generators. model: the exported family the host trains ("cnn", "mlp", ...).
    Raises:
        ValueError: naming the bad value and what is accepted.
    """

    clients: int = 10
    rounds: int = 10
    data: str = "digits"
    tasks: int = 5
    alpha: float = 0.5
    aggregation: str = "fedavg"
    mu: float = 0.01
    masked_aggregation: bool = True
    method: str = "derpp"
    sparsity: float | None = None
    encoding: str = "dense"
    epochs: int = 1
    batch_size: int = 32
    replay_batch: int = 32
    buffer: int = 200
    lr: float | None = None
    fraction: float = 1.0
    round_timeout_s: float = 600.0
    seed: int = 0
    model: str = "cnn"

    def __post_init__(self):
        for name, low in (("clients", 1), ("rounds", 1), ("tasks", 1), ("epochs", 1), ("batch_size", 1),
                          ("replay_batch", 1), ("buffer", 1), ("seed", 0)):
            _count(name, getattr(self, name), low)
        if self.rounds % self.tasks:
            raise ValueError(f"rounds={self.rounds} with tasks={self.tasks}: each task needs the same number of "
                             f"rounds; accepted: a multiple of {self.tasks}")
        if self.data not in DATASETS:
            raise ValueError(f"data={self.data!r}; accepted: {', '.join(DATASETS)}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r}; accepted: {', '.join(AGGREGATIONS)}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding={self.encoding!r}; accepted: {', '.join(ENCODINGS)}")
        if self.encoding != "dense" and self.sparsity is None:
            raise ValueError(f"encoding={self.encoding!r} sends the weights under each device's mask: it needs "
                             "sparsity (SparCL); accepted: a sparsity, or encoding='dense'")
        if not isinstance(self.masked_aggregation, bool):
            raise ValueError(f"masked_aggregation={self.masked_aggregation!r}; accepted: True or False")
        _number("alpha", self.alpha, 0.0, 1e6, True)
        _number("mu", self.mu, 0.0, 1e3, False)
        _number("fraction", self.fraction, 0.0, 1.0, True)
        _number("round_timeout_s", self.round_timeout_s, 0.0, 1e6, True)
        self.online_config()  # method, sparsity, lr, batch sizes

    @property
    def rounds_per_task(self) -> int:
        return self.rounds // self.tasks

    @property
    def learning_rate(self) -> float:
        return DATA_LR[self.data] if self.lr is None else self.lr

    @property
    def proximal_mu(self) -> float:
        return self.mu if self.aggregation == "fedprox" else 0.0

    def online_config(self) -> OnlineConfig:
        """The device learner's settings (the same every round: a state folder records them)."""
        return OnlineConfig(method=self.method, sparsity=self.sparsity, budget=None,
                            buffer=None if self.method == "finetune" else self.buffer, batch_size=self.batch_size,
                            replay_batch=self.replay_batch, lr=self.learning_rate, seed=self.seed, threads=1)

    def client_settings(self) -> dict:
        """What each round's instructions carry to a device (a Flower ConfigRecord: scalars only)."""
        online = self.online_config()
        out = {"method": online.method, "sparsity": -1.0 if online.sparsity is None else float(online.sparsity),
               "buffer": online.buffer or 0, "batch-size": online.batch_size, "replay-batch": online.replay_batch,
               "lr": float(online.lr), "seed": online.seed, "epochs": self.epochs, "encoding": self.encoding,
               "rounds-per-task": self.rounds_per_task}
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FleetConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown fleet settings {unknown}; accepted: {', '.join(sorted(fields))}")
        return cls(**d)


def online_kwargs(settings: dict) -> dict:
    """`open_learner` keyword arguments from a round's settings (`FleetConfig.client_settings`).

    Raises:
        ValueError / KeyError: a setting missing or out of range (OnlineConfig's message).
    """
    sparsity = float(settings["sparsity"])
    method = str(settings["method"])
    return {"method": method, "sparsity": None if sparsity < 0 else sparsity, "budget": None,
            "buffer": None if method == "finetune" else int(settings["buffer"]),
            "batch_size": int(settings["batch-size"]), "replay_batch": int(settings["replay-batch"]),
            "lr": float(settings["lr"]), "seed": int(settings["seed"]), "threads": 1}
