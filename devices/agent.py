"""`edgecl-agent`: the program on the board. It answers the host's requests over a serial link.

    edgecl-agent --port /dev/ttyS0 --workdir ~/edgecl-agent

Requests (each a JSON frame the agent answers with OK or ERROR, see the table in
devices/README): HELLO (version handshake), CAPS, PUT + CHUNK... + PUT_END (artifacts or data,
kept only once every file's sha256 checks), TRAIN (PROGRESS frames, then the run's metrics),
EVAL, BENCH (step latency measured on the board, or with what=fresh-process the peak memory and
cold start of a fresh runtime-only training process), FETCH (the run's latest checkpoint).

Workdir layout: artifacts/<name>/, data/<name>/split.npz, runs/<run>/{result.json,
checkpoints/}, .incoming/ (transfers in progress; cleared at start). Needs numpy, onnxruntime
and pyserial only (tqdm through the loop); never torch.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path

from edgecl.runtime.errors import EdgeclError
from edgecl.runtime.memory import machine_memory

from . import jobs
from .link import Link, LinkClosed, LinkError, LinkTimeout, MsgType, ProtocolError
from .transfer import (DEFAULT_CHUNK_BYTES, FileSpec, Incoming, TransferError, check_name, chunk_spans, clear_incoming,
                       encode_chunk, folder_specs)

PROTOCOL_VERSION = 2  # 2: BENCH what=fresh-process
PUT_KINDS = ("artifact", "data")


def edgecl_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgecl")
    except PackageNotFoundError:
        return "unknown"


def capabilities(workdir: Path) -> dict:
    """What this board offers: machine, software versions, engines, memory, what it holds."""
    memory = machine_memory()  # the figures the agent's own memory check uses (cgroup limit included)
    try:
        import onnxruntime

        ort_version, providers = onnxruntime.__version__, onnxruntime.get_available_providers()
    except ImportError:
        ort_version, providers = None, []
    import numpy

    engines = ["portable"] if ort_version else []
    # ort-training needs onnxruntime-training, whose python API imports torch.
    if ort_version and importlib.util.find_spec("onnxruntime.training") and importlib.util.find_spec("torch"):
        engines.append("ort-training")
    listing = {kind: sorted(p.name for p in (workdir / kind).glob("*") if p.is_dir())
               for kind in ("artifacts", "data", "runs")}
    return {"machine": platform.machine(), "system": platform.system(), "python": platform.python_version(),
            "numpy": numpy.__version__, "onnxruntime": ort_version, "providers": providers, "engines": engines,
            "edgecl": edgecl_version(), "protocol": PROTOCOL_VERSION, "cpus": os.cpu_count(),
            "mem_total_bytes": memory.total_bytes, "mem_available_bytes": memory.available_bytes,
            "disk_free_bytes": shutil.disk_usage(workdir).free, **listing}


class Agent:
    """Serves requests from one link until stopped.

    Args:
        link: the agent's end of the link. workdir: where artifacts, data and runs live.
        progress_s: least time between PROGRESS frames during training.
        heartbeat_s: time between PROGRESS frames ({"alive": true}) while any request is being
            handled, so the host tells a slow board (first onnxruntime import, a long step) from
            a dead one.
        transfer_timeout_s: a transfer with no CHUNK for this long is abandoned (its files deleted).
        chunk_bytes: CHUNK size when sending a checkpoint back.
    """

    def __init__(self, link: Link, workdir: str | Path, progress_s: float = 0.5, heartbeat_s: float = 1.0,
                 transfer_timeout_s: float = 60.0, chunk_bytes: int = DEFAULT_CHUNK_BYTES, log=sys.stderr):
        self.link, self.workdir = link, Path(workdir)
        self.progress_s, self.heartbeat_s, self.chunk_bytes, self.log = progress_s, heartbeat_s, chunk_bytes, log
        self.transfer_timeout_s = transfer_timeout_s
        self.last_chunk = 0.0  # time.monotonic() of the transfer's last PUT or CHUNK
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.incoming: tuple[Incoming, str, str] | None = None
        self.request_id = None
        self.stopped = False
        self.transfer_error: str | None = None
        self.handlers = {MsgType.HELLO: self._hello, MsgType.CAPS: self._caps, MsgType.PUT: self._put,
                         MsgType.PUT_END: self._put_end, MsgType.TRAIN: self._train, MsgType.EVAL: self._eval,
                         MsgType.BENCH: self._bench, MsgType.FETCH: self._fetch}

    def say(self, text: str) -> None:
        print(f"edgecl-agent: {text}", file=self.log, flush=True)

    def serve(self) -> None:
        """Answer requests until `stop()` is called or the port fails (raises LinkClosed)."""
        removed = clear_incoming(self.workdir)
        self.link.discard_input()  # frames a host sent to an agent that is gone are not requests to this one
        self.say(f"serving in {self.workdir}" + (f"; removed {removed} unfinished transfer(s)" if removed else ""))
        while not self.stopped:
            try:
                frame = self.link.recv(timeout=0.2)
            except LinkTimeout:
                self._abandon_stalled_transfer()
                continue
            self.handle(frame)

    def _abandon_stalled_transfer(self) -> None:
        if self.incoming is not None and time.monotonic() - self.last_chunk > self.transfer_timeout_s:
            incoming, kind, name = self.incoming
            self.incoming = None
            incoming.discard()
            self.say(f"transfer of {kind} {name!r} abandoned: no data for {self.transfer_timeout_s:.1f} s "
                     f"({sum(incoming.received):,} of {sum(s.bytes for s in incoming.specs):,} B received); "
                     "nothing kept")

    def stop(self) -> None:
        """Make `serve` return within 0.2 s once the request in hand is done."""
        self.stopped = True

    def handle(self, frame) -> None:
        """Handle one frame. Link failures are logged, not raised (LinkClosed is: the port is gone)."""
        if frame.kind is MsgType.CHUNK:
            self._chunk(frame.payload)
            return
        handler = self.handlers.get(frame.kind)
        self.request_id = None
        try:
            if handler is None:
                raise ProtocolError(f"{frame.kind.name} is not a request; accepted: "
                                    f"{', '.join(k.name for k in self.handlers)}, CHUNK")
            msg = frame.json()
            self.request_id = msg.get("id")
            with self._heartbeat():
                reply = handler(msg)
            if reply is not None:
                self.reply(MsgType.OK, reply)
        except LinkClosed:
            raise
        except LinkError as e:
            if isinstance(e, (ProtocolError, TransferError)):
                self._error(frame.kind, e)
            else:
                self.say(f"{frame.kind.name}: link failed: {e}")
        except (EdgeclError, ValueError, KeyError, FileNotFoundError, TypeError) as e:
            self._error(frame.kind, e)
        except Exception as e:  # an agent on a board keeps serving; the host gets the traceback's last line
            self.say(traceback.format_exc())
            self._error(frame.kind, e, kind="internal")

    @contextlib.contextmanager
    def _heartbeat(self):
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.heartbeat_s):
                try:
                    self.reply(MsgType.PROGRESS, {"alive": True})
                except LinkError:
                    return  # the host is gone; the request's own reply will say so in the log

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def reply(self, kind: MsgType, payload: dict) -> None:
        """Send OK / ERROR / PROGRESS tagged with the request's id (the host drops stale replies)."""
        self.link.send(kind, {**payload, "re": self.request_id})

    def _error(self, request: MsgType, e: Exception, kind: str | None = None) -> None:
        kind = kind or type(e).__name__
        self.say(f"{request.name} failed: {kind}: {e}")
        try:
            self.reply(MsgType.ERROR, {"kind": kind, "message": str(e), "request": request.name})
        except LinkError as link_error:
            self.say(f"could not report the error: {link_error}")

    # --- requests -------------------------------------------------------------------------
    def _hello(self, msg: dict) -> dict:
        if self.incoming is not None:  # a new session: an unfinished transfer is abandoned
            self.incoming[0].discard()
            self.incoming = None
        if msg.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolError(f"host speaks protocol {msg.get('protocol')!r}; this agent speaks {PROTOCOL_VERSION}")
        self.say(f"hello from {msg.get('software', 'a host')}")
        return {"protocol": PROTOCOL_VERSION, "agent": edgecl_version(), "machine": platform.machine()}

    def _caps(self, msg: dict) -> dict:
        return capabilities(self.workdir)

    def _put(self, msg: dict) -> dict:
        if self.incoming is not None:
            self.incoming[0].discard()
            self.incoming = None
        kind, name = msg.get("kind"), check_name(msg.get("name"), "transfer name")
        if kind not in PUT_KINDS:
            raise ValueError(f"kind={kind!r}; accepted: {', '.join(PUT_KINDS)}")
        specs = [FileSpec(**f) for f in msg.get("files", [])]
        self.incoming = (Incoming(self.workdir, specs), kind, name)
        self.transfer_error = None
        self.last_chunk = time.monotonic()
        self.say(f"receiving {kind} {name!r}: {len(specs)} files, {sum(s.bytes for s in specs):,} B")
        return {"ready": True}

    def _chunk(self, payload: bytes) -> None:
        self.last_chunk = time.monotonic()
        if self.transfer_error is not None:
            return
        try:
            if self.incoming is None:
                raise TransferError("CHUNK without a PUT")
            self.incoming[0].write(payload)
        except (TransferError, ProtocolError) as e:
            self.transfer_error = str(e)

    def _put_end(self, msg: dict) -> dict:
        if self.incoming is None:
            raise TransferError("PUT_END without a PUT (the transfer was abandoned: push again)")
        incoming, kind, name = self.incoming
        self.incoming = None
        if self.transfer_error is not None:
            incoming.discard()
            raise TransferError(f"{kind} {name!r} not kept: {self.transfer_error}")
        check = None
        if kind == "artifact":
            from edgecl.runtime.manifest import load_manifest

            check = load_manifest  # the artifact's own manifest must check too
        dest = incoming.commit(self.workdir / ("artifacts" if kind == "artifact" else "data") / name, check)
        self.say(f"kept {kind} {name!r} in {dest}")
        return {"path": str(dest), "files": len(incoming.specs)}

    def _train(self, msg: dict) -> dict:
        spec = jobs.TrainSpec(**msg["spec"])
        self.say(f"train run {spec.run!r}: {spec.strategy().label}, {spec.data.tasks} tasks x {spec.epochs} epochs")
        last = [time.monotonic(), True]  # time of the last PROGRESS, host still listening

        def on_step(step: int, loss: float) -> None:
            now = time.monotonic()
            if last[1] and now - last[0] >= self.progress_s:
                last[0] = now
                try:
                    self.reply(MsgType.PROGRESS, {"step": step, "loss": float(loss)})
                except LinkTimeout as e:
                    last[1] = False  # keep training (checkpoints keep the work); the host can ask again
                    self.say(f"host stopped listening ({e}); training on")

        result = jobs.train(spec, self.workdir, on_step, restart=bool(msg.get("restart", False)))
        self.say(f"run {spec.run!r} done: ACC {100 * result.acc:.2f} %")
        return {"result": result.to_dict()}

    def _eval(self, msg: dict) -> dict:
        data = jobs.DataSpec(**msg["data"])
        return jobs.evaluate(check_name(msg["artifact"], "artifact"), data, self.workdir, msg.get("run"),
                             msg.get("threads", 2))

    def _bench(self, msg: dict) -> dict:
        if msg.get("what", "steps") == "fresh-process":
            return jobs.probe_fresh_process(check_name(msg["artifact"], "artifact"), self.workdir,
                                            msg.get("batch", 32), msg.get("steps", 20), msg.get("threads", 2))
        if msg.get("what", "steps") != "steps":
            raise ValueError(f"bench what={msg['what']!r}; accepted: steps, fresh-process")
        return jobs.bench_steps(check_name(msg["artifact"], "artifact"), self.workdir, msg.get("batch", 32),
                                msg.get("steps", 30), msg.get("warmup", 3), msg.get("threads", 2))

    def _fetch(self, msg: dict) -> None:
        run = check_name(msg.get("run"), "run")
        root = jobs.run_dir(self.workdir, run) / "checkpoints"
        latest = root / "LATEST"
        if not latest.is_file():
            raise FileNotFoundError(f"run {run!r} has no checkpoint on the board")
        folder = root / latest.read_text().strip()
        specs = folder_specs(folder)
        result_path = jobs.run_dir(self.workdir, run) / "result.json"
        result = json.loads(result_path.read_text()) if result_path.is_file() else None
        self.reply(MsgType.OK, {"checkpoint": folder.name, "files": [s.to_dict() for s in specs],
                                    "result": result})
        for index, spec in enumerate(specs):
            with open(folder / spec.name, "rb") as f:
                for offset, length in chunk_spans(spec.bytes, self.chunk_bytes):
                    self.link.send(MsgType.CHUNK, encode_chunk(index, offset, f.read(length)))
        self.say(f"sent checkpoint {folder}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgecl-agent", description="edgecl device agent: serves a host over a "
                                "serial link (pyserial URL: /dev/ttyS0, /dev/ttyUSB0, socket://HOST:PORT).")
    p.add_argument("--port", required=True, help="pyserial URL of the link to the host")
    p.add_argument("--workdir", default=str(Path.home() / "edgecl-agent"), help="artifacts, data and runs")
    p.add_argument("--baud", type=int, default=115200)
    p.add_argument("--ack-timeout", type=float, default=2.0, help="seconds before a frame is resent")
    p.add_argument("--retries", type=int, default=5, help="resends of a frame before giving up on it")
    p.add_argument("--progress", type=float, default=0.5, help="seconds between progress messages in training")
    p.add_argument("--heartbeat", type=float, default=1.0, help="seconds between 'alive' messages while busy")
    p.add_argument("--transfer-timeout", type=float, default=60.0, help="seconds without data before a transfer "
                   "is abandoned")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        link = Link.open(args.port, args.baud, ack_timeout=args.ack_timeout, retries=args.retries, name="agent")
        with link:
            Agent(link, args.workdir, args.progress, args.heartbeat, args.transfer_timeout).serve()
    except LinkClosed as e:
        print(f"edgecl-agent: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
