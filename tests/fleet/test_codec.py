"""Update encodings: round trips of dense / sparse / sparse-q8, their sizes, and every refusal."""

from __future__ import annotations

import numpy as np
import pytest

from edgecl.fleet.codec import ENCODINGS, ModelSpec, UpdateError, decode_update, encode_update, update_nbytes

SPEC = ModelSpec(weights={"conv.weight": (4, 1, 3, 3), "fc.bias": (10,)}, maskable=frozenset({"conv.weight"}),
                 buffers={"bn.running_mean": (4,)})


def model(seed: int = 0):
    """(global weights, trained weights, buffers, masks): the conv masked at 75% sparsity (9 of 36 on),
    zero off its mask as a SparCL device holds it, and two masked entries left at their global value."""
    rng = np.random.default_rng(seed)
    glob = {n: rng.standard_normal(s).astype(np.float32) for n, s in SPEC.weights.items()}
    mask = np.zeros(36, np.float32)
    mask[rng.choice(36, 9, replace=False)] = 1
    mask = mask.reshape(SPEC.weights["conv.weight"])
    trained = {n: g + rng.normal(0, 0.1, g.shape).astype(np.float32) for n, g in glob.items()}
    trained["conv.weight"] *= mask
    on = np.flatnonzero(mask.ravel())[:2]
    trained["conv.weight"].ravel()[on] = glob["conv.weight"].ravel()[on]
    buffers = {"bn.running_mean": rng.standard_normal(4).astype(np.float32)}
    return glob, trained, buffers, {"conv.weight": mask}


def test_dense_round_trip_is_exact_and_keeps_the_mask_as_coverage():
    glob, w, b, masks = model()
    u = decode_update(encode_update(w, b, masks, glob, "dense"), SPEC, glob)
    for name in SPEC.weights:
        np.testing.assert_array_equal(u.weights[name], w[name])
    np.testing.assert_array_equal(u.coverage["conv.weight"], masks["conv.weight"] != 0)
    assert u.coverage["fc.bias"] is None
    np.testing.assert_array_equal(u.buffers["bn.running_mean"], b["bn.running_mean"])


def test_sparse_round_trip_is_exact_on_the_mask_and_covers_exactly_the_mask():
    glob, w, b, masks = model()
    arrays = encode_update(w, b, masks, glob, "sparse")
    assert sorted(arrays) == ["b:bn.running_mean", "m:conv.weight", "v:conv.weight", "w:fc.bias"]
    u = decode_update(arrays, SPEC, glob)
    on = masks["conv.weight"] != 0
    np.testing.assert_array_equal(u.coverage["conv.weight"], on)
    np.testing.assert_array_equal(u.weights["conv.weight"][on], w["conv.weight"][on])
    np.testing.assert_array_equal(u.weights["fc.bias"], w["fc.bias"])  # an unmasked weight goes dense
    assert u.coverage["fc.bias"] is None
    np.testing.assert_array_equal(u.buffers["bn.running_mean"], b["bn.running_mean"])


def test_sparse_q8_is_within_half_a_step_on_the_mask_and_exact_where_nothing_changed():
    glob, w, b, masks = model()
    arrays = encode_update(w, b, masks, glob, "sparse-q8")
    assert arrays["q:conv.weight"].dtype == np.int8 and arrays["q:conv.weight"].shape == (9,)
    u = decode_update(arrays, SPEC, glob)
    on = masks["conv.weight"] != 0
    np.testing.assert_array_equal(u.coverage["conv.weight"], on)
    for name, where in (("conv.weight", on), ("fc.bias", np.ones(10, bool))):
        scale = float(arrays[f"s:{name}"][0])
        delta = w[name] - glob[name]
        assert scale == pytest.approx(np.abs(delta[where]).max() / 127, rel=1e-6)
        err = np.abs(u.weights[name][where] - w[name][where])
        assert err.max() <= scale / 2 + 1e-6 * np.abs(w[name]).max(), (name, err.max(), scale)
        unchanged = where & (delta == 0)
        np.testing.assert_array_equal(u.weights[name][unchanged], glob[name][unchanged])
    assert (delta := w["conv.weight"] - glob["conv.weight"])[on].tolist().count(0.0) == 2
    np.testing.assert_array_equal(u.weights["conv.weight"][~on], glob["conv.weight"][~on])


def test_a_zero_delta_quantises_to_zeros_and_decodes_to_the_global_model():
    glob, _, b, masks = model()
    u = decode_update(encode_update(glob, b, masks, glob, "sparse-q8"), SPEC, glob)
    for name in SPEC.weights:  # on the mask q = 0 adds nothing; off it the global value stands
        np.testing.assert_array_equal(u.weights[name], glob[name])


def test_sparse_is_smaller_than_dense_at_75_percent_sparsity():
    glob, w, b, masks = model()
    sizes = {e: update_nbytes(encode_update(w, b, masks, glob, e)) for e in ENCODINGS}
    # both carry the conv's 5 mask bytes; sparse sends its 9 values in place of all 36
    assert sizes["dense"] - sizes["sparse"] == (36 - 9) * 4
    assert sizes["sparse"] < sizes["dense"]
    assert sizes["sparse-q8"] < sizes["sparse"]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_dense_device_covers_every_entry(encoding):
    glob, w, b, _ = model()
    arrays = encode_update(w, b, {}, glob, encoding)
    assert not any(k.startswith("m:") for k in arrays)
    u = decode_update(arrays, SPEC, glob)
    assert u.coverage == {"conv.weight": None, "fc.bias": None}
    if encoding != "sparse-q8":
        for name in SPEC.weights:
            np.testing.assert_array_equal(u.weights[name], w[name])


def test_an_unknown_encoding_is_a_value_error():
    glob, w, b, masks = model()
    with pytest.raises(ValueError, match="encoding='q4'"):
        encode_update(w, b, masks, glob, "q4")


def _sparse():
    glob, w, b, masks = model()
    return encode_update(w, b, masks, glob, "sparse"), glob


def _q8():
    glob, w, b, masks = model()
    return encode_update(w, b, masks, glob, "sparse-q8"), glob


def _drop(key):
    return lambda a: a.pop(key)


def _set(key, value):
    return lambda a: a.__setitem__(key, value)


def _poke(key, index, value):
    def edit(a):
        a[key] = a[key].copy()
        a[key][index] = value
    return edit


MASK_ALL_ON = np.packbits(np.ones(36, bool))  # 36 bits: 5 bytes with 4 padding bits, here 0

REFUSALS = {  # case: (build, edit, the key the message names)
    "missing weight": (_sparse, _drop("w:fc.bias"), "'fc.bias'"),
    "missing buffer": (_sparse, _drop("b:bn.running_mean"), "b:bn.running_mean"),
    "unknown key": (_sparse, _set("w:head.weight", np.zeros(3, np.float32)), "w:head.weight"),
    "unknown prefix": (_sparse, _set("x:fc.bias", np.zeros(10, np.float32)), "x:fc.bias"),
    "wrong dtype": (_sparse, _set("w:fc.bias", np.zeros(10, np.float64)), "w:fc.bias"),
    "wrong shape": (_sparse, _set("w:fc.bias", np.zeros((2, 5), np.float32)), "w:fc.bias"),
    "not an array": (_sparse, _set("w:fc.bias", [0.0] * 10), "w:fc.bias"),
    "nan in w:": (_sparse, _poke("w:fc.bias", 3, np.nan), "w:fc.bias"),
    "inf in v:": (_sparse, _poke("v:conv.weight", 0, np.inf), "v:conv.weight"),
    "nan in b:": (_sparse, _poke("b:bn.running_mean", 1, np.nan), "b:bn.running_mean"),
    "mask padding bits": (_sparse, _poke("m:conv.weight", 4, 0b0000_0001), "m:conv.weight"),
    "mask wrong length": (_sparse, _set("m:conv.weight", np.zeros(4, np.uint8)), "m:conv.weight"),
    "mask wrong dtype": (_sparse, _set("m:conv.weight", np.zeros(5, np.int8)), "m:conv.weight"),
    "v: count is not the mask's": (_sparse, _set("m:conv.weight", MASK_ALL_ON), "v:conv.weight"),
    "v: without m:": (_sparse, _drop("m:conv.weight"), "v:conv.weight"),
    "q: without s:": (_q8, _drop("s:conv.weight"), "s:conv.weight"),
    "q: wrong dtype": (_q8, lambda a: a.__setitem__("q:fc.bias", a["q:fc.bias"].astype(np.int16)), "q:fc.bias"),
    "q: count is not the mask's": (_q8, _set("m:conv.weight", MASK_ALL_ON), "q:conv.weight"),
    "scale 0": (_q8, _set("s:fc.bias", np.zeros(1, np.float32)), "s:fc.bias"),
    "scale negative": (_q8, _set("s:fc.bias", np.full(1, -0.5, np.float32)), "s:fc.bias"),
    "scale nan": (_q8, _set("s:fc.bias", np.full(1, np.nan, np.float32)), "s:fc.bias"),
    "scale overflows the weight": (_q8, lambda a: (a.__setitem__("s:fc.bias", np.full(1, 3e38, np.float32)),
                                                   a.__setitem__("q:fc.bias", np.full(10, 127, np.int8))), "'fc.bias'"),
    "m: of a weight with no mask": (_sparse, _set("m:fc.bias", np.zeros(2, np.uint8)), "m:fc.bias"),
    "w: and v: of one weight": (_sparse, _set("w:conv.weight", np.zeros((4, 1, 3, 3), np.float32)), "v:conv.weight"),
    "w: and q: of one weight": (_q8, _set("w:fc.bias", np.zeros(10, np.float32)), "q:fc.bias"),
}


@pytest.mark.filterwarnings("error::RuntimeWarning")  # refused quietly: no overflow warning on the way
@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_malformed_update_is_refused_naming_the_key(case):
    build, edit, named = REFUSALS[case]
    arrays, glob = build()
    decode_update(arrays, SPEC, glob)  # valid before the edit
    edit(arrays)
    with pytest.raises(UpdateError) as e:
        decode_update(arrays, SPEC, glob)
    assert named in str(e.value)


@pytest.mark.parametrize("update", [None, [("w:fc.bias", np.zeros(10, np.float32))], "w:fc.bias"])
def test_an_update_that_is_not_a_dict_is_refused(update):
    glob, *_ = model()
    with pytest.raises(UpdateError, match="accepted: a dict"):
        decode_update(update, SPEC, glob)


def test_keys_that_are_not_strings_are_refused_as_unknown():
    arrays, glob = _sparse()
    arrays[0] = np.zeros(1, np.float32)
    arrays[b"w:fc.bias"] = np.zeros(10, np.float32)
    with pytest.raises(UpdateError, match="unknown keys"):
        decode_update(arrays, SPEC, glob)


def test_decoding_does_not_alias_the_received_arrays():
    arrays, glob = _sparse()
    u = decode_update(arrays, SPEC, glob)
    u.weights["fc.bias"][:] = 0
    assert arrays["w:fc.bias"].any()
    np.testing.assert_array_equal(glob["fc.bias"], model()[0]["fc.bias"])
