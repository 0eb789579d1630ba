"""A serial line with faults: two pseudo-terminals joined by a thread that copies bytes between them.

The host opens `relay.host_path`, the agent `relay.agent_path` (both plain pyserial ports). Faults
are placed at byte offsets of one direction's stream ("to_agent" or "to_host"): flip a byte, drop
a run of bytes, hold the line for a while, cut it. The relay keeps both slave ends open, so a
killed agent looks like a silent line (as on a real UART), not a hang-up.
"""

from __future__ import annotations

import dataclasses
import os
import select
import sys
import threading
import time
import tty

DIRECTIONS = ("to_agent", "to_host")


@dataclasses.dataclass
class Fault:
    """At stream offset `at`: flip (XOR 0xFF) one byte, drop `drop` bytes, hold the line `hold_s`
    seconds, cut the line for good (`cut`), or call `action()` (e.g. kill the agent)."""

    at: int
    flip: bool = False
    drop: int = 0
    hold_s: float = 0.0
    cut: bool = False
    action: object = None
    done: bool = False


class Relay:
    """Args: bytes_per_s: pace each direction like a serial line (115200 baud 8N1: 11520), or None."""

    def __init__(self, bytes_per_s: float | None = None):
        self.bytes_per_s = bytes_per_s
        self.clock = {d: 0.0 for d in DIRECTIONS}  # when the paced line is free again
        self._fds = []
        self.masters, self.paths = {}, {}
        for side in ("host", "agent"):
            master, slave = os.openpty()
            tty.setraw(slave)
            os.set_blocking(master, False)
            self._fds += [master, slave]
            self.masters[side], self.paths[side] = master, os.ttyname(slave)
        self.host_path, self.agent_path = self.paths["host"], self.paths["agent"]
        self.faults = {d: [] for d in DIRECTIONS}
        self.offset = {d: 0 for d in DIRECTIONS}
        self.held_until = {d: 0.0 for d in DIRECTIONS}
        self.held = {d: b"" for d in DIRECTIONS}
        self.cut = {d: False for d in DIRECTIONS}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def add(self, direction: str, fault: Fault) -> Fault:
        """Place a fault at an absolute offset of `direction`'s stream (see `offset`)."""
        with self.lock:
            self.faults[direction].append(fault)
        return fault

    def after(self, direction: str, skip: int, **fault) -> Fault:
        """A fault `skip` bytes after what has passed so far in `direction`."""
        with self.lock:
            f = Fault(self.offset[direction] + skip, **fault)
            self.faults[direction].append(f)
        return f

    def inject(self, direction: str, data: bytes) -> None:
        """Write `data` into the line now (garbage)."""
        self._write(direction, data)

    def heal(self) -> None:
        """Remove every pending fault and reconnect a cut line."""
        with self.lock:
            for d in DIRECTIONS:
                self.faults[d].clear()
                self.cut[d] = False
                self.held_until[d] = 0.0

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass

    # --- internals ----------------------------------------------------------------------
    def _write(self, direction: str, data: bytes) -> None:
        master = self.masters["agent" if direction == "to_agent" else "host"]
        try:
            os.write(master, data)
        except (BlockingIOError, OSError):
            pass  # nobody reading and the buffer is full: bytes lost, like a UART overrun

    def _apply(self, direction: str, data: bytes) -> bytes:
        out = bytearray()
        with self.lock:
            start = self.offset[direction]
            self.offset[direction] += len(data)
            for i, b in enumerate(data):
                pos = start + i
                keep = not self.cut[direction]
                for f in self.faults[direction]:
                    if f.done or pos < f.at:
                        continue
                    if f.action is not None:
                        f.action()
                        self.cut[direction] = f.cut
                        keep = not f.cut
                        f.done = True
                    elif f.cut:
                        self.cut[direction] = True
                        keep = False
                        f.done = True
                    elif f.flip:
                        b ^= 0xFF
                        f.done = True
                    elif f.drop:
                        keep = False
                        f.done = pos + 1 >= f.at + f.drop
                    elif f.hold_s:
                        self.held_until[direction] = time.monotonic() + f.hold_s
                        f.done = True
                if keep:
                    out.append(b)
        return bytes(out)

    def _run(self) -> None:
        sources = {self.masters["host"]: "to_agent", self.masters["agent"]: "to_host"}
        while not self._stop.is_set():
            ready, _, _ = select.select(list(sources), [], [], 0.01)
            for fd in ready:
                try:
                    data = os.read(fd, 65536)
                except (BlockingIOError, OSError):
                    continue
                direction = sources[fd]
                self.held[direction] += self._apply(direction, data)
            now = time.monotonic()
            for direction in DIRECTIONS:
                if self.held[direction] and now >= self.held_until[direction]:
                    n = len(self.held[direction])
                    if self.bytes_per_s:
                        start = max(self.clock[direction], now - 0.01)  # no credit saved up past 10 ms
                        n = min(n, int((now - start) * self.bytes_per_s))
                        self.clock[direction] = start + n / self.bytes_per_s
                    data, self.held[direction] = self.held[direction][:n], self.held[direction][n:]
                    if data:
                        self._write(direction, data)


# What a board does not have: the agent must run without all of these.
NOT_ON_BOARD = ("torch", "onnx", "onnxscript", "sklearn", "edgecl.bench", "edgecl.exporters")


def agent_command(port: str, workdir, ack_timeout: float = 0.3, retries: int = 3, python: str = sys.executable,
                  blocked=NOT_ON_BOARD) -> list[str]:
    """The agent's command line on `port`, in a process where the `blocked` modules cannot be imported.

    python: the interpreter (e.g. the wrapper of an emulated aarch64 one).
    """
    launcher = (f"import sys, runpy\nfor m in {tuple(blocked)!r}: sys.modules[m] = None\n"
                "sys.argv[0] = 'edgecl-agent'\nrunpy.run_module('edgecl.devices.agent', run_name='__main__')")
    return [python, "-c", launcher, "--port", port, "--workdir", str(workdir), "--ack-timeout", str(ack_timeout),
            "--retries", str(retries), "--progress", "0.2", "--heartbeat", "0.5", "--transfer-timeout", "5"]
