"""A reliable message link over a serial line: framing, CRC32, acknowledgements, retransmission.

Every message travels in one frame (all integers little-endian):

    magic  b"EdCL"            4 bytes   where a frame starts (the reader resynchronises on it)
    kind   u8                 1         MsgType
    flags  u8                 1         0 (reserved)
    seq    u32                4         sender's sequence number (ACK / NAK: the seq answered)
    length u32                4         payload bytes, <= MAX_PAYLOAD
    hcrc   u32                4         CRC32 of kind..length: a damaged length is never trusted
    payload                   length
    pcrc   u32                4         CRC32 of the payload

Delivery is stop-and-wait: the sender keeps one frame in flight until the peer answers ACK
with its seq; a NAK (payload damaged, header intact) or `ack_timeout` without an answer
resends it, at most `retries` times, then `LinkTimeout` is raised. The receiver delivers a
frame once: a frame with the seq it delivered last (its ACK was lost, so the sender resent it)
is acknowledged again and dropped. Each side starts from a random seq, so a restarted peer
is never mistaken for a duplicate. Bytes that are not a valid frame are skipped up to the
next magic. `encode_frame` and `parse_frames` are pure functions; `Link` holds the state.

pyserial is imported only when a port is opened; ports are pyserial URLs
(`/dev/ttyUSB0`, `/dev/pts/3`, `socket://host:port`, `loop://`).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import random
import struct
import threading
import time
import zlib

from edgecl.runtime.errors import EdgeclError

MAGIC = b"EdCL"
HEADER = struct.Struct("<BBII")  # kind, flags, seq, length
HEADER_BYTES = len(MAGIC) + HEADER.size + 4
CRC = struct.Struct("<I")
OVERHEAD_BYTES = HEADER_BYTES + 4
MAX_PAYLOAD = 1 << 20
SEQ_MOD = 1 << 32
POLL_S = 0.02  # longest single blocking read; every wait is a loop of these against a deadline


class LinkError(EdgeclError):
    """The link failed: base class of every error raised by edgecl.devices' link and agent."""


class LinkTimeout(LinkError):
    """The other side did not acknowledge or answer in time: it is gone, stalled or not listening."""


class LinkClosed(LinkError):
    """The port itself failed or was closed (cable pulled, device gone, pseudo-terminal hung up)."""


class ProtocolError(LinkError):
    """The other side sent a well-formed frame that makes no sense here (wrong kind or version)."""


class AgentError(LinkError):
    """The agent received the request and refused or failed it; `kind` names the failure."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"agent: {kind}: {message}")
        self.kind = kind
        self.message = message


class MsgType(enum.IntEnum):
    """Frame kinds. ACK and NAK are the link's own; the rest carry messages (see devices/README)."""

    ACK = 0x01
    NAK = 0x02
    HELLO = 0x10
    CAPS = 0x11
    PUT = 0x12
    CHUNK = 0x13
    PUT_END = 0x14
    TRAIN = 0x15
    EVAL = 0x16
    BENCH = 0x17
    FETCH = 0x18
    PROGRESS = 0x20
    OK = 0x21
    ERROR = 0x22


@dataclasses.dataclass(frozen=True)
class Frame:
    """One intact frame: kind, sequence number, payload bytes."""

    kind: MsgType
    seq: int
    payload: bytes = b""

    def __post_init__(self):
        if not 0 <= self.seq < SEQ_MOD:
            raise ValueError(f"seq={self.seq}; accepted: 0 <= seq < 2**32")
        if len(self.payload) > MAX_PAYLOAD:
            raise ValueError(f"payload of {len(self.payload)} bytes; accepted: at most {MAX_PAYLOAD}")

    def json(self) -> dict:
        """The payload decoded as a JSON object. Raises ProtocolError if it is not one."""
        try:
            value = json.loads(self.payload.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ProtocolError(f"{self.kind.name} payload is not JSON: {e}") from e
        if not isinstance(value, dict):
            raise ProtocolError(f"{self.kind.name} payload is {type(value).__name__}; accepted: a JSON object")
        return value


@dataclasses.dataclass(frozen=True)
class Damaged:
    """A frame whose header checked but whose payload CRC did not: the receiver NAKs `seq`."""

    kind: int
    seq: int


def crc32(data: bytes) -> int:
    """CRC-32 (IEEE 802.3, zlib's; crc32(b"123456789") == 0xCBF43926)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def encode_frame(kind: MsgType | int, seq: int, payload: bytes = b"") -> bytes:
    """The bytes of one frame (layout in the module docstring).

    Raises:
        ValueError: an unknown kind, seq outside [0, 2**32), or a payload above MAX_PAYLOAD.
    """
    try:
        kind = MsgType(kind)
    except ValueError:
        raise ValueError(f"kind={kind!r}; accepted: {', '.join(f'{k.name}={k.value}' for k in MsgType)}") from None
    frame = Frame(kind, seq, bytes(payload))
    header = HEADER.pack(int(frame.kind), 0, frame.seq, len(frame.payload))
    return MAGIC + header + CRC.pack(crc32(header)) + frame.payload + CRC.pack(crc32(frame.payload))


def parse_frames(buffer: bytes) -> tuple[list[Frame | Damaged], int, int]:
    """Split received bytes into frames.

    Args:
        buffer: bytes received so far (may start mid-frame, hold garbage, end mid-frame).
    Returns:
        (events, consumed, skipped): intact `Frame`s and `Damaged` ones in order; how many
        leading bytes of `buffer` are done with (keep `buffer[consumed:]` for the next call);
        how many of those were garbage (not part of any frame whose header checked).
    """
    events: list[Frame | Damaged] = []
    pos = skipped = 0
    n = len(buffer)
    while True:
        start = buffer.find(MAGIC, pos)
        if start < 0:  # keep a tail that may be the start of a magic
            keep = next((k for k in range(min(len(MAGIC) - 1, n - pos), 0, -1) if MAGIC.startswith(buffer[n - k:])), 0)
            skipped += n - keep - pos
            return events, n - keep, skipped
        skipped += start - pos
        pos = start
        if n - pos < HEADER_BYTES:
            return events, pos, skipped
        header = buffer[pos + len(MAGIC): pos + len(MAGIC) + HEADER.size]
        (hcrc,) = CRC.unpack_from(buffer, pos + len(MAGIC) + HEADER.size)
        kind, flags, seq, length = HEADER.unpack(header)
        if hcrc != crc32(header) or length > MAX_PAYLOAD or kind not in MsgType._value2member_map_:
            pos += 1  # not a frame start after all: look for the next magic
            skipped += 1
            continue
        end = pos + HEADER_BYTES + length + 4
        if n < end:
            return events, pos, skipped
        payload = buffer[pos + HEADER_BYTES: end - 4]
        (pcrc,) = CRC.unpack_from(buffer, end - 4)
        events.append(Frame(MsgType(kind), seq, bytes(payload)) if pcrc == crc32(payload) else Damaged(kind, seq))
        pos = end


@dataclasses.dataclass
class LinkStats:
    """Counters of what the link met (for reports and tests)."""

    sent: int = 0
    received: int = 0
    retransmits: int = 0
    damaged: int = 0
    duplicates: int = 0
    garbage_bytes: int = 0


def open_port(url: str, baudrate: int = 115200):
    """Open a pyserial URL (device path, pseudo-terminal, socket://host:port, loop://).

    Raises:
        LinkClosed: pyserial is missing or the port cannot be opened (names the port).
    """
    try:
        import serial
    except ImportError as e:
        raise LinkClosed("the serial link needs pyserial: pip install pyserial") from e
    try:
        return serial.serial_for_url(url, baudrate=baudrate, timeout=POLL_S, write_timeout=10)
    except (serial.SerialException, OSError, ValueError) as e:
        raise LinkClosed(f"cannot open port {url!r}: {e}") from e


class Link:
    """One end of a reliable link over an open port (anything with read, write, in_waiting).

    Args:
        port: an open pyserial port (see `open_port`).
        ack_timeout: seconds to wait for an ACK before resending, on top of the frame's time
            on the wire (a 4 KiB chunk takes 0.36 s at 115200 baud).
        retries: resends of one frame before giving up (LinkTimeout).
        name: "host" or "agent", for messages.
        baudrate: bits per second of a real serial line, or None (pseudo-terminal, socket): the
            time a frame takes on the wire (10 bits a byte) is added to every wait for it.
    """

    def __init__(self, port, ack_timeout: float = 2.0, retries: int = 5, name: str = "host",
                 baudrate: int | None = None):
        if not ack_timeout > 0:
            raise ValueError(f"ack_timeout={ack_timeout!r}; accepted: > 0 seconds")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries={retries!r}; accepted: an integer >= 0")
        if baudrate is not None and (isinstance(baudrate, bool) or not isinstance(baudrate, int) or baudrate < 1):
            raise ValueError(f"baudrate={baudrate!r}; accepted: bits per second >= 1, or None")
        self.port, self.ack_timeout, self.retries, self.name = port, ack_timeout, retries, name
        self.baudrate = baudrate
        self.stats = LinkStats()
        self._seq = random.SystemRandom().randrange(SEQ_MOD)
        self._last_rx: int | None = None
        self._rx = b""
        self._partial_since: float | None = None  # when the frame waiting at the start of _rx was first seen
        self._inbox: collections.deque[Frame] = collections.deque()
        self._answers: dict[int, MsgType] = {}
        self._lock = threading.RLock()  # one thread at a time reads and writes (an agent's heartbeat sends too)

    @classmethod
    def open(cls, url: str, baudrate: int = 115200, **kwargs) -> Link:
        """Open a pyserial URL; the baud rate counts in timeouts only on a real serial device."""
        port = open_port(url, baudrate)
        real = "://" not in url and not url.startswith("/dev/pts/")
        return cls(port, baudrate=baudrate if real else None, **kwargs)

    def wire_s(self, n_bytes: int) -> float:
        """Seconds `n_bytes` take on the wire (8N1: 10 bits a byte); 0 without a baud rate."""
        return 10 * n_bytes / self.baudrate if self.baudrate else 0.0

    def close(self) -> None:
        try:
            self.port.close()
        except Exception:  # closing a port whose device vanished may raise; it is closed all the same
            pass

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- sending ------------------------------------------------------------------------
    def send(self, kind: MsgType, payload: bytes | dict = b"") -> None:
        """Send one message and wait until the other side acknowledges it.

        Raises:
            LinkTimeout: no ACK after 1 + retries attempts. LinkClosed: the port failed.
        """
        if isinstance(payload, dict):
            payload = json.dumps(payload).encode()
        with self._lock:
            self._send(MsgType(kind), payload)

    def _send(self, kind: MsgType, payload: bytes) -> None:
        self._seq = (self._seq + 1) % SEQ_MOD
        seq = self._seq
        frame = encode_frame(kind, seq, payload)
        self._answers.clear()
        t0 = time.monotonic()
        for attempt in range(1 + self.retries):
            if attempt:
                self.stats.retransmits += 1
            self._write(frame)
            deadline = time.monotonic() + self.ack_timeout + self.wire_s(len(frame) + OVERHEAD_BYTES)
            while time.monotonic() < deadline:
                self._pump(deadline)
                answer = self._answers.pop(seq, None)
                if answer is MsgType.ACK:
                    self.stats.sent += 1
                    return
                if answer is MsgType.NAK:
                    break  # damaged on the way: resend now
        raise LinkTimeout(f"{self.name}: no acknowledgement of {MsgType(kind).name} (seq {seq}, {len(payload)} B) "
                          f"after {1 + self.retries} attempts in {time.monotonic() - t0:.1f} s: the other side is "
                          "not answering (not running, restarted, wrong port or baud rate?)")

    # --- receiving ----------------------------------------------------------------------
    def recv(self, timeout: float) -> Frame:
        """The next message from the other side (already acknowledged, duplicates dropped).

        Raises:
            LinkTimeout: nothing arrived within `timeout` seconds. LinkClosed: the port failed.
        """
        deadline = time.monotonic() + timeout
        while not self._inbox:
            if time.monotonic() >= deadline:
                raise LinkTimeout(f"{self.name}: no message within {timeout:.1f} s: the other side is gone or busy")
            with self._lock:
                self._pump(deadline)
        return self._inbox.popleft()

    def poll(self) -> Frame | None:
        """A message if one has arrived, else None, without waiting."""
        if not self._inbox:
            with self._lock:
                self._pump(time.monotonic())
        return self._inbox.popleft() if self._inbox else None

    def discard_input(self) -> None:
        """Forget queued messages, partial frames and bytes the port holds (start of a new session)."""
        with self._lock:
            self._inbox.clear()
            self._rx = b""
            self._partial_since = None
            try:
                self.port.reset_input_buffer()
            except Exception as e:
                raise LinkClosed(f"{self.name}: the port failed: {e}") from e

    # --- internals ----------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        try:
            self.port.write(data)
            self.port.flush()
        except Exception as e:  # serial.SerialException, OSError, timeouts: all mean the port failed
            raise LinkClosed(f"{self.name}: writing to the port failed: {e}") from e

    def _read(self, deadline: float) -> bytes:
        try:
            waiting = self.port.in_waiting
            if waiting:
                return self.port.read(waiting)
            if time.monotonic() >= deadline:
                return b""
            return self.port.read(1)  # blocks at most the port's timeout (POLL_S)
        except Exception as e:
            raise LinkClosed(f"{self.name}: reading from the port failed: {e}") from e

    def _pump(self, deadline: float) -> None:
        """Read what has arrived (waiting at most until `deadline`) and handle every frame in it.

        A frame whose header checked but whose rest has not come within `ack_timeout` was cut
        short (bytes lost, sender gone): it is given up, so that the bytes after its header
        (perhaps a whole new frame) are read as frames, not as its payload.
        """
        self._rx += self._read(deadline)
        while self._rx:
            events, consumed, skipped = parse_frames(self._rx)
            self._rx = self._rx[consumed:]
            self.stats.garbage_bytes += skipped
            self._handle(events)
            now = time.monotonic()
            if consumed or not self._rx or self._partial_since is None:
                self._partial_since = now if self._rx else None
                return
            length = HEADER.unpack_from(self._rx, len(MAGIC))[3] if len(self._rx) >= HEADER_BYTES else 0
            if now - self._partial_since <= self.ack_timeout + self.wire_s(OVERHEAD_BYTES + length):
                return
            self._rx = self._rx[1:]  # skip this frame's magic and look again
            self.stats.garbage_bytes += 1
            self._partial_since = None

    def _handle(self, events: list[Frame | Damaged]) -> None:
        for event in events:
            if isinstance(event, Damaged):
                self.stats.damaged += 1
                if event.kind not in (MsgType.ACK, MsgType.NAK):
                    self._write(encode_frame(MsgType.NAK, event.seq))
            elif event.kind in (MsgType.ACK, MsgType.NAK):
                self._answers[event.seq] = event.kind
            else:
                self._write(encode_frame(MsgType.ACK, event.seq))
                if event.seq == self._last_rx:
                    self.stats.duplicates += 1
                    continue
                self._last_rx = event.seq
                self.stats.received += 1
                self._inbox.append(event)
