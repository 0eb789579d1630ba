"""The device side: a Flower `ClientApp` around edgecl's online learner. Imports no torch.

Each round the device receives the global model and the round's settings, opens its learner on
its state folder (buffer, masks, optimizer, stream position: all from its last save), sets the
global weights (and FedProx's anchor), learns the examples that arrived since its last round,
saves everything in one atomic write, and replies with its update (`codec.encode_update`), its
example count and metrics. Flower recreates a `ClientApp`'s objects every round and a device may
be killed at any moment: the state folder is the only memory, so a restarted device resumes its
stream and buffer where its last completed round left them (a round it did not finish is learned
again). A device that missed rounds learns all the examples that arrived meanwhile.

Where a device's files are comes from its node config (`flower-supernode --node-config
'data-file="..." state-dir="..." artifacts="..."'`), or from a resolver in a simulation.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edgecl.runtime.manifest import load_manifest
from edgecl.runtime.online import open_learner

from .codec import ModelSpec, decode_update, encode_update
from .config import online_kwargs
from .records import from_record, to_record
from .scenario import ClientStream

NODE_KEYS = ("data-file", "state-dir", "artifacts")


@dataclasses.dataclass(frozen=True)
class ClientPaths:
    """A device's own files: its stream (`scenario.ClientStream`), its state folder, the exported model."""

    data_file: Path
    state_dir: Path
    artifacts: Path


def paths_from_node_config(context: Context) -> ClientPaths:
    """A SuperNode's `--node-config` keys data-file, state-dir and artifacts.

    Raises:
        KeyError: a key missing (names all three).
    """
    missing = [k for k in NODE_KEYS if k not in context.node_config]
    if missing:
        raise KeyError(f"node config lacks {missing}; accepted: flower-supernode --node-config "
                       "'data-file=\"...\" state-dir=\"...\" artifacts=\"...\"'")
    return ClientPaths(*(Path(str(context.node_config[k])) for k in NODE_KEYS))


_streams: dict[tuple, ClientStream] = {}  # one process may run many rounds (a simulation's actors)


def _stream(path: Path) -> ClientStream:
    st = os.stat(path)
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _streams:
        _streams.clear()
        _streams[key] = ClientStream.load(path)
    return _streams[key]


def learn_round(learner, stream: ClientStream, server_round: int, rounds_per_task: int,
                epochs: int) -> tuple[int, float, dict]:
    """Learn the examples that arrived since the learner's saved position, task by task, `epochs`
    passes each; the caller saves. Returns (examples learned, their mean loss or 0.0 if none, the
    app state to save: position and task)."""
    state = learner.app_state
    start, task = int(state.get("position", 0)), int(state.get("task", 0))
    end = stream.arrived(server_round, rounds_per_task)
    losses = []
    row = start
    while row < end:
        t = stream.task_of(row)
        stop = min(end, int(stream.task_offsets[t + 1]))
        if t > task:
            learner.end_task()  # SparCL's TDM update; the buffer records the next task id
            task = t
        for _ in range(epochs):
            losses.append(learner.learn(stream.x[row:stop], stream.y[row:stop]))
        row = stop
    learned = max(end - start, 0)
    return learned, float(np.mean(losses)) if losses else 0.0, {"position": max(start, end), "task": task,
                                                                 "round": server_round}


def train_device(paths: ClientPaths, settings: dict, server_round: int, global_arrays: dict[str, np.ndarray],
                 proximal_mu: float = 0.0) -> tuple[dict[str, np.ndarray], dict]:
    """One device's round, Flower aside: returns (update arrays, metrics).

    A kill before the save leaves the previous round's state: the round is learned again. A round
    the state folder already holds (killed after the save, before the reply reached the server) is
    not learned twice: the saved model is sent again, so a retried round replies the same."""
    spec = ModelSpec.from_manifest(load_manifest(paths.artifacts))
    incoming = decode_update(global_arrays, spec, {})
    stream = _stream(paths.data_file)
    with open_learner(paths.artifacts, paths.state_dir, **online_kwargs(settings)) as learner:
        done = learner.app_state
        if done.get("round") != server_round:
            learner.set_weights(incoming.weights, incoming.buffers)
            learner.set_proximal(proximal_mu, incoming.weights if proximal_mu else None)
            n, loss, done = learn_round(learner, stream, server_round, int(settings["rounds-per-task"]),
                                        int(settings["epochs"]))
            done |= {"learned": n, "loss": loss}
            learner.save(app_state=done)
        update = encode_update(learner.parameters(), learner.buffers(), learner.masks(), incoming.weights,
                               str(settings["encoding"]))
        metrics = {"num-examples": int(done["learned"]), "loss": float(done["loss"]), "position": done["position"],
                   "samples-seen": learner.samples_seen}
    return update, metrics


def handle_train(msg: Message, context: Context, resolve: Callable[[Context], ClientPaths]) -> Message:
    """A train instruction in, the device's reply out (`train_device` on the device's files)."""
    config = msg.content["config"]
    update, metrics = train_device(resolve(context), dict(config), int(config["server-round"]),
                                   from_record(msg.content["arrays"]), float(config.get("proximal-mu", 0.0)))
    metrics["partition-id"] = int(context.node_config.get("partition-id", -1))
    content = RecordDict({"arrays": to_record(update), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def make_client_app(resolve: Callable[[Context], ClientPaths] = paths_from_node_config) -> ClientApp:
    """A `ClientApp` whose devices find their files with `resolve` (node config by default)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, resolve)

    return app


app = make_client_app()  # what a SuperNode loads (the Flower app's `clientapp` component)
