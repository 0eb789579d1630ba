"""The protobuf wire format, as far as ONNX files need it: read fields, write the few messages edgecl adds.

A device has numpy and onnxruntime but not the `onnx` package, so `inference_model` edits ONNX
files at the wire level: a message is a sequence of fields, each a key (field number << 3 | wire
type) and a value: a varint (wire type 0), 8 or 4 fixed bytes (1, 5) or a length-prefixed payload
(2: strings, bytes, nested messages, packed numbers). `read_fields` splits a message into fields
and keeps each field's bytes, so whatever is not edited is written back verbatim.

Field numbers are those of onnx/onnx.proto (the same in onnx.proto3): ModelProto graph 7,
metadata_props 14; GraphProto node 1, initializer 5, input 11, output 12, value_info 13;
NodeProto input 1, output 2, name 3, op_type 4, attribute 5; AttributeProto name 1, i 3, t 5,
g 6, graphs 11, type 20; TensorProto dims 1, data_type 2, name 8, raw_data 9; ValueInfoProto
name 1, type 2; TypeProto tensor_type 1; TypeProto.Tensor elem_type 1, shape 2;
TensorShapeProto dim 1; its Dimension dim_value 1, dim_param 2; StringStringEntryProto key 1, value 2.
"""

from __future__ import annotations

import dataclasses

import numpy as np

VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5

# TensorProto.DataType values and the little-endian numpy dtype of their raw_data
FLOAT, INT64 = 1, 7
RAW_DTYPES = {FLOAT: np.dtype("<f4"), INT64: np.dtype("<i8")}
# AttributeProto.AttributeType values
ATTR_INT, ATTR_TENSOR = 2, 4


class WireError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of a message as read.

    value: the varint's value (wire type 0), else the payload (a memoryview of the message's bytes).
    raw: the whole field as it was read (key, length and payload), to write back unchanged.
    """

    number: int
    wire_type: int
    value: int | memoryview
    raw: memoryview

    @property
    def text(self) -> str:
        """The payload as a UTF-8 string (a `string` field)."""
        return bytes(self.value).decode("utf-8")


def _varint_at(data: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise WireError("a varint runs past the end of the message")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise WireError("a varint is longer than 10 bytes")


def read_fields(data: bytes | memoryview) -> list[Field]:
    """Every field of one message, in file order.

    Raises:
        WireError: a truncated field, or a wire type other than 0, 1, 2, 5 (3 and 4, groups, are
            not used by ONNX).
    """
    data = memoryview(data)
    fields, pos = [], 0
    while pos < len(data):
        start = pos
        key, pos = _varint_at(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == VARINT:
            value, pos = _varint_at(data, pos)
        elif wire_type in (FIXED64, FIXED32, LEN):
            if wire_type == LEN:
                size, pos = _varint_at(data, pos)
            else:
                size = 8 if wire_type == FIXED64 else 4
            if pos + size > len(data):
                raise WireError(f"field {number} needs {size} bytes at offset {pos}; the message has {len(data)}")
            value, pos = data[pos : pos + size], pos + size
        else:
            raise WireError(f"field {number} has wire type {wire_type}; accepted: 0, 1, 2, 5")
        if number < 1:
            raise WireError(f"a field has number {number}; accepted: >= 1")
        fields.append(Field(number, wire_type, value, data[start:pos]))
    return fields


def strings(fields: list[Field], number: int) -> list[str]:
    """The values of a `(repeated) string` field, in order."""
    return [f.text for f in fields if f.number == number and f.wire_type == LEN]


def varints(fields: list[Field], number: int) -> list[int]:
    """The values of a `(repeated) int` field, packed or not, as unsigned 64-bit integers."""
    out = []
    for f in fields:
        if f.number == number and f.wire_type == VARINT:
            out.append(f.value)
        elif f.number == number and f.wire_type == LEN:  # packed
            pos, payload = 0, f.value
            while pos < len(payload):
                value, pos = _varint_at(payload, pos)
                out.append(value)
    return out


def signed(value: int) -> int:
    """An int64 read as an unsigned varint, back to its sign."""
    return value - (1 << 64) if value >= 1 << 63 else value


def varint(value: int) -> bytes:
    """The varint of an int64 (a negative one as its 64-bit two's complement, 10 bytes)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def int_field(number: int, value: int) -> bytes:
    return varint(number << 3 | VARINT) + varint(value)


def len_header(number: int, size: int) -> bytes:
    """The key and length that precede a length-delimited payload of `size` bytes."""
    return varint(number << 3 | LEN) + varint(size)


def len_field(number: int, payload: bytes | str) -> bytes:
    payload = payload.encode("utf-8") if isinstance(payload, str) else payload
    return len_header(number, len(payload)) + payload


def tensor(name: str, array: np.ndarray) -> bytes:
    """A TensorProto (dims, data_type, name, raw_data) holding a float32 or int64 array.

    Raises:
        TypeError: any other dtype.
    """
    kinds = {np.dtype(np.float32): FLOAT, np.dtype(np.int64): INT64}
    if array.dtype not in kinds:
        raise TypeError(f"tensor {name!r} is {array.dtype}; accepted: float32, int64")
    kind = kinds[array.dtype]
    raw = memoryview(np.ascontiguousarray(array, RAW_DTYPES[kind])).cast("B")  # no copy until the join
    head = [int_field(1, d) for d in array.shape] + [int_field(2, kind), len_field(8, name)]
    return b"".join([*head, len_header(9, raw.nbytes), raw])


def attribute_int(name: str, value: int) -> bytes:
    """An AttributeProto of type INT."""
    return len_field(1, name) + int_field(3, value) + int_field(20, ATTR_INT)


def attribute_tensor(name: str, tensor_proto: bytes) -> bytes:
    """An AttributeProto of type TENSOR."""
    return len_field(1, name) + len_field(5, tensor_proto) + int_field(20, ATTR_TENSOR)


def node(op_type: str, inputs: list[str], outputs: list[str], name: str, attributes: list[bytes] = ()) -> bytes:
    """A NodeProto of the default (ai.onnx) domain."""
    parts = [len_field(1, i) for i in inputs] + [len_field(2, o) for o in outputs]
    parts += [len_field(3, name), len_field(4, op_type)] + [len_field(5, a) for a in attributes]
    return b"".join(parts)


def tensor_type(type_proto: bytes | memoryview) -> tuple[int | None, list[int | str | None] | None]:
    """(elem_type, dims) of a TypeProto of a tensor: a dim is its value, its name, or None (unknown);
    dims is None when the shape is unknown; (None, None) for a type that is not a tensor."""
    tensor_fields = [f for f in read_fields(type_proto) if f.number == 1 and f.wire_type == LEN]
    if not tensor_fields:
        return None, None
    fields = read_fields(tensor_fields[-1].value)
    elem = varints(fields, 1)
    shapes = [f for f in fields if f.number == 2 and f.wire_type == LEN]
    if not shapes:
        return (elem[-1] if elem else None), None
    dims = []
    for dim in (f for f in read_fields(shapes[-1].value) if f.number == 1 and f.wire_type == LEN):
        d = read_fields(dim.value)
        value, param = varints(d, 1), strings(d, 2)
        dims.append(signed(value[-1]) if value else param[-1] if param else None)
    return (elem[-1] if elem else None), dims
