"""The host's side of the link: push artifacts and data to a board's agent, train, evaluate, benchmark.

    with connect("/dev/ttyUSB0") as board:
        board.push(artifact_folder)
        board.push_data(train, test, "digits-s0")
        result = board.train(TrainSpec(run="run1", artifact="cnn", data=DataSpec("digits-s0", tasks=2), epochs=2))

Every method returns a typed result or raises: AgentError (the agent refused or failed, with
its reason), LinkTimeout (the agent stopped answering), LinkClosed (the port failed),
TransferError (a file did not check). Nothing waits forever: every wait has a timeout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import tempfile
import time
from pathlib import Path

from edgecl.runtime.data import Dataset
from edgecl.runtime.loop import RunResult

from .agent import PROTOCOL_VERSION, edgecl_version
from .jobs import DataSpec, TrainSpec, save_split
from .link import AgentError, Frame, Link, LinkError, LinkTimeout, MsgType, ProtocolError
from .transfer import (DEFAULT_CHUNK_BYTES, FileSpec, Incoming, TransferError, check_name, chunk_spans, encode_chunk,
                       folder_specs)


@dataclasses.dataclass(frozen=True)
class Hello:
    """The agent's answer to the handshake, and the round trip it took (ms, measured)."""

    protocol: int
    agent: str
    machine: str
    round_trip_ms: float


@dataclasses.dataclass(frozen=True)
class PushResult:
    """A folder the agent received and kept (every file's sha256 checked on the board)."""

    kind: str
    name: str
    board_path: str
    files: int
    bytes: int
    seconds: float
    retransmits: int


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Accuracy per task (fractions) on the board, and whose weights: "artifact" or a checkpoint name."""

    class_il: list
    task_il: list
    source: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class BoardMeasurement:
    """Where a measurement on the board ran: always measured there, never projected."""

    steps: int
    batch: int
    threads: int | None
    engine: str
    model: str
    machine: str
    measured: bool = True

    @classmethod
    def from_reply(cls, msg: dict):
        """From the agent's OK reply (extra keys are ignored).

        Raises:
            ProtocolError: the reply lacks fields (an agent of another edgecl version).
        """
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in msg]
        if missing:
            raise ProtocolError(f"the agent's reply lacks {', '.join(missing)} for a {cls.__name__}; update the agent "
                                "to this edgecl version")
        return cls(**{f.name: msg[f.name] for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BoardLatency(BoardMeasurement):
    """Latency in ms: median and IQR over `steps` training steps (median_ms, iqr_ms) and over
    `steps` inference calls of the same batch (infer_*)."""

    median_ms: float
    iqr_ms: float
    infer_median_ms: float
    infer_iqr_ms: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class BoardProcess(BoardMeasurement):
    """A fresh runtime-only training process (edgecl.runtime.probe): peak and post-import resident
    memory in bytes (None where the board's OS does not say), and the first training step's end
    in ms from the spawn (the cold start)."""

    peak_rss_bytes: int
    imports_rss_bytes: int | None
    interpreter_rss_bytes: int | None
    first_step_ms: float
    torch_imported: bool


@dataclasses.dataclass(frozen=True)
class FetchResult:
    """A run's latest checkpoint, copied into `path` (a folder `load_checkpoint` reads), and its metrics."""

    path: Path
    checkpoint: str
    result: RunResult | None


def run_result(d: dict) -> RunResult:
    """A RunResult from its `to_dict()` form (as the agent sends it)."""
    return RunResult(**{f.name: d[f.name] for f in dataclasses.fields(RunResult)})


class Device:
    """A connection to one agent.

    Args:
        link: the host's end. reply_timeout: seconds of silence after which a request is
            given up (the agent sends a heartbeat every second while it works on one).
    """

    def __init__(self, link: Link, reply_timeout: float = 30.0):
        if not reply_timeout > 0:
            raise ValueError(f"reply_timeout={reply_timeout!r}; accepted: > 0 seconds")
        self.link, self.reply_timeout = link, reply_timeout
        self._ids = itertools.count(int(time.time() * 1000) % 1_000_000_000)

    def close(self) -> None:
        self.link.close()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, kind: MsgType, payload: dict | None = None, on_progress=None,
                timeout: float | None = None) -> dict:
        """Send one request and return the agent's OK payload.

        Raises:
            AgentError: the agent answered ERROR. LinkTimeout: no answer within `timeout`
                (default reply_timeout) since the request or the last PROGRESS.
        """
        request_id = next(self._ids)
        self.link.send(kind, {**(payload or {}), "id": request_id})
        timeout = self.reply_timeout if timeout is None else timeout
        while True:
            try:
                frame = self.link.recv(timeout)
            except LinkTimeout as e:
                raise LinkTimeout(f"no answer to {kind.name} within {timeout:.1f} s: the agent is gone, stalled "
                                  f"or was restarted ({e})") from e
            if frame.kind not in (MsgType.OK, MsgType.ERROR, MsgType.PROGRESS):
                continue  # leftovers of an earlier request that timed out
            msg = frame.json()
            if msg.get("re") != request_id:
                continue
            if frame.kind is MsgType.PROGRESS:
                if on_progress is not None and "step" in msg:
                    on_progress(msg)
            elif frame.kind is MsgType.ERROR:
                raise AgentError(msg.get("kind", "error"), msg.get("message", ""))
            else:
                return msg

    def hello(self) -> Hello:
        """The version handshake. Raises AgentError (kind ProtocolError) if the versions differ."""
        self.link.discard_input()
        t0 = time.perf_counter()
        msg = self.request(MsgType.HELLO, {"protocol": PROTOCOL_VERSION, "software": f"edgecl {edgecl_version()}"})
        return Hello(msg["protocol"], msg["agent"], msg["machine"], 1000 * (time.perf_counter() - t0))

    def capabilities(self) -> dict:
        """Machine, Python, onnxruntime, engines, memory, and the artifacts, data and runs on the board."""
        return self.request(MsgType.CAPS)

    def push(self, folder: str | Path, kind: str = "artifact", name: str | None = None,
             chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> PushResult:
        """Send a flat folder (artifacts from `edgecl export`, or data) to the board.

        The agent keeps it under artifacts/<name> or data/<name> only once every file's
        sha256 checks (and, for artifacts, the manifest's own); an earlier copy is replaced.

        Raises:
            TransferError: bad folder or name. AgentError: the board refused the files.
            LinkTimeout / LinkClosed: the link failed mid-way (the board keeps nothing partial).
        """
        folder = Path(folder)
        name = check_name(name or folder.name, "name")
        specs = folder_specs(folder)
        t0, retransmits = time.perf_counter(), self.link.stats.retransmits
        self.request(MsgType.PUT, {"kind": kind, "name": name, "files": [s.to_dict() for s in specs]})
        for index, spec in enumerate(specs):
            with open(folder / spec.name, "rb") as f:
                for offset, length in chunk_spans(spec.bytes, chunk_bytes):
                    try:
                        self.link.send(MsgType.CHUNK, encode_chunk(index, offset, f.read(length)))
                    except LinkError as e:
                        raise type(e)(f"push of {kind} {name!r} stopped at {spec.name} byte {offset:,} of "
                                      f"{spec.bytes:,}: {e}") from e
        reply = self.request(MsgType.PUT_END)
        return PushResult(kind, name, reply["path"], len(specs), sum(s.bytes for s in specs),
                          time.perf_counter() - t0, self.link.stats.retransmits - retransmits)

    def push_data(self, train: Dataset, test: Dataset, name: str) -> PushResult:
        """Send a train / test pair as data `name` (what a board without scikit-learn trains on)."""
        with tempfile.TemporaryDirectory() as tmp:
            save_split(train, test, tmp, name)
            return self.push(tmp, "data", name)

    def train(self, spec: TrainSpec, on_progress=None, restart: bool = False) -> RunResult:
        """Run (or resume, same run id and spec) a training run on the board; its metrics.

        Args:
            on_progress: called with {"step", "loss"} dicts while the board trains.
            restart: drop the run's checkpoints on the board and start over.
        """
        msg = self.request(MsgType.TRAIN, {"spec": spec.to_dict(), "restart": restart}, on_progress)
        return run_result(msg["result"])

    def evaluate(self, artifact: str, data: DataSpec, run: str | None = None, threads: int | None = 2) -> EvalResult:
        """Accuracy per task on the board, of the artifact's weights or of run `run`'s latest checkpoint."""
        msg = self.request(MsgType.EVAL, {"artifact": artifact, "data": dataclasses.asdict(data), "run": run,
                                          "threads": threads})
        return EvalResult(msg["class_il"], msg["task_il"], msg["source"])

    def bench(self, artifact: str, batch: int = 32, steps: int = 30, warmup: int = 3,
              threads: int | None = 2) -> BoardLatency:
        """Training-step latency of `artifact` measured on the board."""
        msg = self.request(MsgType.BENCH, {"artifact": artifact, "batch": batch, "steps": steps, "warmup": warmup,
                                           "threads": threads})
        return BoardLatency.from_reply(msg)

    def probe_process(self, artifact: str, batch: int = 32, steps: int = 20,
                      threads: int | None = 2) -> BoardProcess:
        """Peak memory and cold start of a fresh process training `artifact` `steps` steps on the board."""
        msg = self.request(MsgType.BENCH, {"artifact": artifact, "what": "fresh-process", "batch": batch,
                                           "steps": steps, "threads": threads})
        return BoardProcess.from_reply(msg)

    def fetch_checkpoint(self, run: str, out_dir: str | Path) -> FetchResult:
        """Copy run `run`'s latest checkpoint to out_dir/<checkpoint> (+ LATEST) after checking every sha256.

        Raises:
            AgentError: no such run. TransferError: a file did not check (nothing kept).
        """
        out_dir = Path(out_dir)
        msg = self.request(MsgType.FETCH, {"run": run})
        checkpoint = check_name(msg["checkpoint"], "checkpoint")
        incoming = Incoming(out_dir, [FileSpec(**f) for f in msg["files"]])
        try:
            while not incoming.complete:
                frame: Frame = self.link.recv(self.reply_timeout)
                if frame.kind is MsgType.PROGRESS:  # the agent's heartbeat
                    continue
                if frame.kind is not MsgType.CHUNK:
                    raise ProtocolError(f"expected CHUNK of checkpoint {checkpoint}, got {frame.kind.name}")
                incoming.write(frame.payload)
        except (LinkError, TransferError):
            incoming.discard()
            raise
        path = incoming.commit(out_dir / checkpoint)
        (out_dir / "LATEST").write_text(checkpoint + "\n")
        return FetchResult(path, checkpoint, run_result(msg["result"]) if msg.get("result") else None)


def ensure_data(device: Device, source: str, seed: int = 0, force: bool = False, progress: bool = False) -> dict:
    """Make the data `source` names available on the board; returns the DataSpec fields to use.

    Args:
        source: "digits" (scikit-learn's digits, loaded here: the board needs no scikit-learn),
            "npz:PATH" (an .npz on the host with x and y), "board:SPEC" (a data set spec the
            board loads itself, see edgecl.runtime.data.load_dataset), or the name of pushed data.
        seed: seeds the stratified 80/20 train/test split of digits and npz data.
        force: push even if the board already holds data of that name.
    Returns:
        {"data": name} or {"board_path": spec}.
    """
    if source.startswith("board:"):
        return {"board_path": source[len("board:"):]}
    if source != "digits" and not source.startswith("npz:"):
        return {"data": check_name(source, "data name")}
    from edgecl.runtime.data import load_digits, load_npz
    from edgecl.runtime.scenarios import train_test_split

    if source == "digits":
        name = f"digits-s{seed}"
    else:
        path = Path(source[len("npz:"):])
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
        name = check_name(f"{path.stem}-{digest}-s{seed}", "data name")
    if force or name not in device.capabilities()["data"]:
        dataset = load_digits() if source == "digits" else load_npz(path)
        train, test = train_test_split(dataset, 0.2, seed)
        if progress:
            print(f"pushing data {name!r} ({len(train.y)} train, {len(test.y)} test examples)", flush=True)
        device.push_data(train, test, name)
    return {"data": name}


def board_latency(port: str, artifacts: str | Path, batch: int = 32, steps: int = 30, warmup: int = 3,
                  threads: int | None = 2, baudrate: int = 115200) -> BoardLatency:
    """Push `artifacts` to the board on `port` (kept as "bench-<sha of manifest>") and measure there.

    For `bench latency --device serial:PORT`: the figures are measured on the board, never projected.
    """
    with connect(port, baudrate) as device:
        return device.bench(push_for_bench(device, artifacts), batch, steps, warmup, threads)


def push_for_bench(device: Device, artifacts: str | Path) -> str:
    """The board's name of `artifacts` ("bench-<sha of manifest>"), pushed first if the board lacks it."""
    manifest_sha = hashlib.sha256((Path(artifacts) / "manifest.json").read_bytes()).hexdigest()[:10]
    name = f"bench-{manifest_sha}"
    if name not in device.capabilities()["artifacts"]:
        device.push(artifacts, "artifact", name)
    return name


def connect(port: str, baudrate: int = 115200, ack_timeout: float = 2.0, retries: int = 5,
            reply_timeout: float = 30.0) -> Device:
    """Open `port` (a pyserial URL), shake hands with the agent, return the Device.

    Raises:
        LinkClosed: the port cannot be opened. LinkTimeout: no agent answers.
        AgentError: the agent speaks another protocol version.
    """
    device = Device(Link.open(port, baudrate, ack_timeout=ack_timeout, retries=retries, name="host"), reply_timeout)
    try:
        device.hello()
    except BaseException:
        device.close()
        raise
    return device


def result_json(result) -> str:
    return json.dumps(dataclasses.asdict(result), default=str, indent=2)
