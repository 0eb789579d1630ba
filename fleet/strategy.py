"""The server's Flower strategies: Flower's FedAvg and FedProx, aggregating with masks and
refusing bad updates.

Flower's strategies drive the rounds (`Strategy.start`: sampling, instructions, the round timeout,
centralised evaluation); these subclasses replace only `aggregate_train`:

- every reply is decoded and checked on its own (`codec.decode_update`); a malformed or
  non-finite one is refused and logged, the others are aggregated, and if none is left the global
  model stays as it was. Flower's own FedAvg would refuse the whole round on one inconsistent
  reply, or average a NaN in.
- aggregation is `aggregate.masked_average` over the accepted updates, sorted by partition id
  (so the order replies arrive in never changes the result), weighted by "num-examples".
- each round's traffic is counted with Flower's `count_bytes` of the records: instructions sent
  down to each sampled device, replies sent up.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx
from flwr.supercore import log

from .aggregate import average_buffers, masked_average
from .codec import ModelSpec, UpdateError, decode_update, dense_model, split_model
from .records import from_record, to_record


def _record_bytes(content) -> int:
    return int(sum(record.count_bytes() for record in content.values()))


def _partition(msg: Message) -> int:
    metrics = msg.content.get("metrics")
    value = metrics.get("partition-id", -1) if isinstance(metrics, MetricRecord) else -1
    return int(value) if isinstance(value, (int, float)) and math.isfinite(value) else -1


def _count(msg: Message) -> float:
    metrics = msg.content.get("metrics")
    if not isinstance(metrics, MetricRecord):
        raise UpdateError("no 'metrics' record; accepted: a MetricRecord with 'num-examples'")
    n = metrics.get("num-examples")
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0:
        raise UpdateError(f"num-examples={n!r}; accepted: a finite number >= 0")
    return float(n)


class FleetAggregation:
    """Mixin over a Flower FedAvg: masked aggregation, per-reply refusal, bytes per round.

    `rounds` collects per round: bytes_down, bytes_up, sampled, replied, failed (error replies:
    a device that dropped out or crashed; `failures` holds the last line of each reason), refused
    ([{partition, reason}]), timed_out (sampled, no reply before the round timeout: stragglers and
    dead devices) and aggregated.
    """

    def setup_fleet(self, spec: ModelSpec, masked: bool = True) -> None:
        """masked=False: the ablation, plain FedAvg of the devices' zero-filled weights."""
        self.spec, self.masked = spec, masked
        self.rounds: dict[int, dict] = {}
        self._global: dict = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._global = from_record(arrays)
        self.rounds[server_round] = {"bytes_down": sum(_record_bytes(m.content) for m in messages), "bytes_up": 0,
                                     "sampled": len(messages), "replied": 0, "failed": 0, "refused": [],
                                     "timed_out": 0, "aggregated": 0, "failures": []}
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        info = self.rounds[server_round]
        info["replied"] = len(replies)
        info["timed_out"] = info["sampled"] - len(replies)
        accepted = []
        weights, buffers = split_model(self._global)
        for msg in replies:
            if msg.has_error():
                info["failed"] += 1
                lines = [line for line in str(msg.error.reason).splitlines() if line.strip()]
                reason = lines[-1].strip()[:300] if lines else "no reason given"  # a traceback's last line
                info["failures"].append(reason)
                log(WARNING, "round %d: device %d failed: %s", server_round, msg.metadata.src_node_id, reason)
                continue
            info["bytes_up"] += _record_bytes(msg.content)
            try:
                record = msg.content.get("arrays")
                if not isinstance(record, ArrayRecord):
                    raise UpdateError("no 'arrays' record; accepted: an ArrayRecord of the update")
                arrays = from_record(record)
                accepted.append((_partition(msg), _count(msg), decode_update(arrays, self.spec, weights)))
            except (UpdateError, TypeError, ValueError) as e:
                info["refused"].append({"partition": _partition(msg), "reason": str(e)})
                log(WARNING, "round %d: refused the update of partition %d: %s", server_round, _partition(msg), e)
        accepted.sort(key=lambda a: a[0])
        info["aggregated"] = len(accepted)
        if not accepted or sum(n for _, n, _ in accepted) <= 0:
            return None, None
        counts = [n for _, n, _ in accepted]
        updates = [u if self.masked else dataclasses.replace(u, coverage={k: None for k in u.coverage})
                   for _, _, u in accepted]
        new = dense_model(masked_average(weights, updates, counts), average_buffers(buffers, updates, counts))
        metrics = MetricRecord({"num-examples": float(sum(counts)), "devices": len(accepted)})
        return to_record(new), metrics


class FleetFedAvg(FleetAggregation, FedAvg):
    """Flower's FedAvg with masked aggregation and refusal of bad updates."""


class FleetFedProx(FleetAggregation, FedProx):
    """Flower's FedProx (sends "proximal-mu"; each device adds the term) with the same aggregation."""


def build_strategy(aggregation: str, spec: ModelSpec, clients: int, fraction: float, mu: float, masked: bool = True):
    """The strategy of `FleetConfig.aggregation`, waiting for all `clients` devices to connect."""
    sampled = max(1, math.ceil(clients * fraction))
    kwargs = dict(fraction_train=fraction, fraction_evaluate=0.0, min_train_nodes=sampled, min_evaluate_nodes=0,
                  min_available_nodes=clients)
    strategy = FleetFedProx(proximal_mu=mu, **kwargs) if aggregation == "fedprox" else FleetFedAvg(**kwargs)
    strategy.setup_fleet(spec, masked)
    return strategy
