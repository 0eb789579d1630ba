"""Framing, CRC, chunking and file checks as pure functions on literal bytes; a Link over loop://."""

from __future__ import annotations

import hashlib
import struct
import zlib

import pytest

from edgecl.devices.link import (MAGIC, OVERHEAD_BYTES, Damaged, Frame, Link, LinkTimeout, MsgType, crc32,
                                 encode_frame, parse_frames)
from edgecl.devices.transfer import (FileSpec, Incoming, TransferError, check_name, chunk_spans, clear_incoming,
                                     decode_chunk, encode_chunk, folder_specs)

HELLO_HI = (b"EdCL" + b"\x10\x00" + b"\x07\x00\x00\x00" + b"\x02\x00\x00\x00"
            + struct.pack("<I", zlib.crc32(b"\x10\x00\x07\x00\x00\x00\x02\x00\x00\x00")) + b"hi"
            + struct.pack("<I", zlib.crc32(b"hi")))


def test_crc32_check_value():
    assert crc32(b"123456789") == 0xCBF43926


def test_encode_frame_layout_on_literal_bytes():
    assert encode_frame(MsgType.HELLO, 7, b"hi") == HELLO_HI
    assert len(encode_frame(MsgType.ACK, 0)) == OVERHEAD_BYTES == 22


@pytest.mark.parametrize("kind, seq, payload", [(0x7F, 1, b""), (MsgType.OK, -1, b""), (MsgType.OK, 2**32, b""),
                                                (MsgType.OK, 0, b"x" * (2**20 + 1))])
def test_encode_frame_refuses_bad_fields(kind, seq, payload):
    with pytest.raises(ValueError, match="accepted"):
        encode_frame(kind, seq, payload)


def test_parse_whole_split_and_back_to_back_frames():
    two = HELLO_HI + encode_frame(MsgType.OK, 8, b"{}")
    events, consumed, skipped = parse_frames(two)
    assert events == [Frame(MsgType.HELLO, 7, b"hi"), Frame(MsgType.OK, 8, b"{}")]
    assert (consumed, skipped) == (len(two), 0)
    # Fed in two pieces: the first call keeps the partial frame, the second finds it.
    events, consumed, _ = parse_frames(two[:30])
    assert events == [Frame(MsgType.HELLO, 7, b"hi")] and consumed == len(HELLO_HI)
    events, consumed, _ = parse_frames(two[consumed:])
    assert events == [Frame(MsgType.OK, 8, b"{}")]


def test_parse_skips_garbage_and_keeps_a_partial_magic():
    events, consumed, skipped = parse_frames(b"\x00\xffgarbage" + HELLO_HI + b"junkEd")
    assert events == [Frame(MsgType.HELLO, 7, b"hi")]
    assert skipped == 9 + 4  # before the frame, and "junk"; "Ed" may start the next magic
    assert consumed == 9 + len(HELLO_HI) + 4


def test_damaged_payload_is_reported_with_its_seq():
    bad = bytearray(HELLO_HI)
    bad[18] ^= 0x01  # first payload byte
    events, consumed, skipped = parse_frames(bytes(bad))
    assert events == [Damaged(MsgType.HELLO, 7)] and consumed == len(bad) and skipped == 0


@pytest.mark.parametrize("index", [4, 6, 10, 14])  # kind, seq, length, header CRC
def test_damaged_header_resynchronises_on_the_next_frame(index):
    bad = bytearray(HELLO_HI)
    bad[index] ^= 0x40
    events, _, skipped = parse_frames(bytes(bad) + HELLO_HI)
    assert events == [Frame(MsgType.HELLO, 7, b"hi")]
    assert skipped == len(HELLO_HI)


def test_a_length_beyond_the_limit_is_not_trusted():
    header = struct.pack("<BBII", MsgType.OK, 0, 1, 2**31)
    fake = MAGIC + header + struct.pack("<I", crc32(header))
    events, consumed, skipped = parse_frames(fake + HELLO_HI)
    assert events == [Frame(MsgType.HELLO, 7, b"hi")] and skipped == len(fake)


def test_chunks_on_literal_bytes():
    assert chunk_spans(10, 4) == [(0, 4), (4, 4), (8, 2)]
    assert chunk_spans(0, 4) == [] and chunk_spans(4, 4) == [(0, 4)]
    with pytest.raises(ValueError, match="chunk_bytes"):
        chunk_spans(10, 0)
    payload = encode_chunk(3, 258, b"ab")
    assert payload == b"\x03\x00" + b"\x02\x01\x00\x00\x00\x00\x00\x00" + b"ab"
    assert decode_chunk(payload) == (3, 258, b"ab")


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 129, None])
def test_unsafe_names_are_refused(name):
    with pytest.raises(TransferError, match="not accepted"):
        check_name(name)


def _specs(files: dict) -> list[FileSpec]:
    return [FileSpec(n, len(d), hashlib.sha256(d).hexdigest()) for n, d in files.items()]


def test_incoming_commits_only_checked_files(tmp_path):
    files = {"a.bin": b"x" * 10, "b.bin": b"", "c.bin": b"yz"}
    inc = Incoming(tmp_path, _specs(files))
    for i, (name, data) in enumerate(files.items()):
        for off, n in chunk_spans(len(data), 4):
            inc.write(encode_chunk(i, off, data[off:off + n]))
    assert inc.complete
    dest = inc.commit(tmp_path / "store" / "thing")
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == files
    assert [s.to_dict() for s in folder_specs(dest)] == [s.to_dict() for s in _specs(files)]
    assert list((tmp_path / ".incoming").iterdir()) == []


def test_incoming_with_a_wrong_sha256_keeps_nothing(tmp_path):
    (tmp_path / "store" / "thing").mkdir(parents=True)
    (tmp_path / "store" / "thing" / "old.bin").write_bytes(b"old")
    spec = FileSpec("a.bin", 3, hashlib.sha256(b"abc").hexdigest())
    inc = Incoming(tmp_path, [spec])
    inc.write(encode_chunk(0, 0, b"abd"))  # the right size, altered content
    with pytest.raises(TransferError, match="sha256"):
        inc.commit(tmp_path / "store" / "thing")
    assert [p.name for p in (tmp_path / "store" / "thing").iterdir()] == ["old.bin"]  # the old copy stands
    assert list((tmp_path / ".incoming").iterdir()) == []


def test_incoming_refuses_chunks_out_of_order_and_short_files(tmp_path):
    inc = Incoming(tmp_path, _specs({"a.bin": b"abcdef"}))
    with pytest.raises(TransferError, match="expected offset 0"):
        inc.write(encode_chunk(0, 2, b"cd"))
    with pytest.raises(TransferError, match="#1"):
        inc.write(encode_chunk(1, 0, b"cd"))
    inc.write(encode_chunk(0, 0, b"abc"))
    with pytest.raises(TransferError, match="received 3 of 6 bytes"):
        inc.commit(tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    Incoming(tmp_path, _specs({"b": b"1"}))
    assert clear_incoming(tmp_path) == 1


def test_link_over_loopback_delivers_once_and_times_out_cleanly():
    link = Link.open("loop://", ack_timeout=0.1, retries=1)
    link.send(MsgType.HELLO, {"protocol": 1})  # loop:// answers its own frames: ACKed by itself
    frame = link.recv(0.5)
    assert frame.kind is MsgType.HELLO and frame.json() == {"protocol": 1}
    link.port.write(encode_frame(MsgType.OK, 5, b"{}") * 2)  # a duplicate (same seq) is delivered once
    assert link.recv(0.5).seq == 5
    with pytest.raises(LinkTimeout, match="no message within 0.2 s"):
        link.recv(0.2)
    assert link.stats.duplicates == 1


def test_send_gives_up_after_the_retries_when_nobody_answers(tmp_path):
    import os
    import tty

    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        link = Link.open(os.ttyname(slave), ack_timeout=0.1, retries=2)
        with pytest.raises(LinkTimeout, match="after 3 attempts"):
            link.send(MsgType.CAPS, {})
        assert link.stats.retransmits == 2
        # Every attempt went out on the wire, byte for byte the same frame.
        sent = os.read(master, 4096)
        events, _, _ = parse_frames(sent)
        assert len(events) == 3 and len({e.seq for e in events}) == 1
        link.close()
    finally:
        os.close(master)
        os.close(slave)


def test_link_arguments_and_wire_time():
    port = Link.open("loop://").port
    assert Link(port, baudrate=9600).wire_s(960) == 1.0  # 10 bits a byte on an 8N1 line
    assert Link(port).wire_s(960) == 0.0 and Link.open("loop://").baudrate is None
    for bad, message in (({"ack_timeout": 0}, "ack_timeout=0"), ({"retries": -1}, "retries=-1"),
                         ({"baudrate": 0}, "baudrate=0")):
        with pytest.raises(ValueError, match=message):
            Link(port, **bad)


def test_unopenable_port_names_itself():
    from edgecl.devices.link import LinkClosed

    with pytest.raises(LinkClosed, match="cannot open port '/dev/no-such-tty'"):
        Link.open("/dev/no-such-tty")
