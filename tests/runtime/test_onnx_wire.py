"""The protobuf wire reader / writer behind `export_inference`, on literal bytes and against the onnx package."""

from __future__ import annotations

import numpy as np
import pytest

from edgecl.runtime import onnx_wire as w


@pytest.mark.parametrize("value, encoded", [
    (0, b"\x00"), (1, b"\x01"), (127, b"\x7f"), (128, b"\x80\x01"), (300, b"\xac\x02"),
    (2**63 - 1, b"\xff" * 8 + b"\x7f"), (-1, b"\xff" * 9 + b"\x01"),
])
def test_varints_are_protobufs(value, encoded):
    assert w.varint(value) == encoded
    (field,) = w.read_fields(b"\x08" + encoded)
    assert (field.number, field.wire_type, w.signed(field.value)) == (1, w.VARINT, value)


def test_fields_are_read_in_order_with_their_bytes():
    # protobuf's documentation examples: field 1 = 150, field 2 = "testing"; then 8 and 4 fixed bytes
    message = b"\x08\x96\x01" + b"\x12\x07testing" + b"\x19" + bytes(range(8)) + b"\x25\x01\x02\x03\x04"
    assert w.int_field(1, 150) + w.len_field(2, "testing") == message[:12]
    fields = w.read_fields(message)
    assert [(f.number, f.wire_type) for f in fields] == [(1, 0), (2, 2), (3, 1), (4, 5)]
    assert fields[0].value == 150 and fields[1].text == "testing" and bytes(fields[2].value) == bytes(range(8))
    assert b"".join(bytes(f.raw) for f in fields) == message


def test_packed_and_unpacked_repeated_ints_read_alike():
    packed = w.len_field(1, w.varint(3) + w.varint(300) + w.varint(-2))
    unpacked = w.int_field(1, 3) + w.int_field(1, 300) + w.int_field(1, -2)
    for message in (packed, unpacked):
        assert [w.signed(v) for v in w.varints(w.read_fields(message), 1)] == [3, 300, -2]


@pytest.mark.parametrize("message, error", [
    (b"\x12\x07test", r"field 2 needs 7 bytes at offset 2; the message has 6"),
    (b"\x08\x96", r"a varint runs past the end"),
    (b"\x0b", r"field 1 has wire type 3; accepted: 0, 1, 2, 5"),
    (b"\x00\x01", r"a field has number 0"),
    (b"\x08" + b"\xff" * 11, r"longer than 10 bytes"),
])
def test_malformed_messages_are_refused(message, error):
    with pytest.raises(w.WireError, match=error):
        w.read_fields(message)


def test_a_tensor_holds_dims_type_name_and_little_endian_raw_data():
    fields = w.read_fields(w.tensor("t", np.array([[1, -2, 3]], np.int64)))
    assert w.varints(fields, 1) == [1, 3] and w.varints(fields, 2) == [w.INT64] and w.strings(fields, 8) == ["t"]
    (raw,) = [f.value for f in fields if f.number == 9]
    assert bytes(raw) == np.array([1, -2, 3], "<i8").tobytes()
    with pytest.raises(TypeError, match=r"tensor 'u' is float64; accepted: float32, int64"):
        w.tensor("u", np.zeros(2))


def test_the_messages_written_parse_in_onnx_as_meant():
    onnx = pytest.importorskip("onnx", reason="the onnx package (not on the emulated board)")
    from onnx import helper, numpy_helper

    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 7.5
    t = onnx.TensorProto.FromString(w.tensor("weight", a))
    assert t.name == "weight" and t.data_type == onnx.TensorProto.FLOAT
    assert np.array_equal(numpy_helper.to_array(t), a)
    scalar = onnx.TensorProto.FromString(w.tensor("s", np.array(3, np.int64)))
    assert list(scalar.dims) == [] and numpy_helper.to_array(scalar) == 3
    n = onnx.NodeProto.FromString(w.node("Softmax", ["logits"], ["p"], "sm", [w.attribute_int("axis", -1)]))
    assert (list(n.input), list(n.output), n.name, n.op_type, n.domain) == (["logits"], ["p"], "sm", "Softmax", "")
    assert helper.get_attribute_value(n.attribute[0]) == -1 and n.attribute[0].type == onnx.AttributeProto.INT
    value = w.attribute_tensor("value", w.tensor("", np.ones(1, np.float32)))
    c = onnx.NodeProto.FromString(w.node("ConstantOfShape", ["shape"], ["ones"], "c", [value]))
    assert c.attribute[0].type == onnx.AttributeProto.TENSOR
    assert np.array_equal(numpy_helper.to_array(c.attribute[0].t), np.ones(1, np.float32))
    typ = helper.make_tensor_type_proto(onnx.TensorProto.INT64, ["N", 3, None])
    assert w.tensor_type(typ.SerializeToString()) == (w.INT64, ["N", 3, None])
    assert w.tensor_type(helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, None).SerializeToString()) == \
        (w.FLOAT, None)
