"""A Generator's exact state stored in a checkpoint part and restored."""

from __future__ import annotations

import numpy as np
import pytest

from edgecl.runtime.checkpoint import load_checkpoint, rng_from_state_array, rng_state_array, save_checkpoint


@pytest.mark.parametrize("kind", ["PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"])
def test_rng_state_round_trips_through_a_checkpoint(tmp_path, kind):
    gen = np.random.Generator(getattr(np.random, kind)(1234))
    gen.standard_normal(17)  # move off the seed, and leave a cached half of a Gaussian pair where it applies
    state = rng_state_array(gen)
    assert state.dtype == np.uint8 and state.ndim == 1
    save_checkpoint(tmp_path, {"loop": {"rng": state}}, {"step": 0})
    restored = rng_from_state_array(load_checkpoint(tmp_path).parts["loop"]["rng"])
    np.testing.assert_array_equal(restored.standard_normal(50), gen.standard_normal(50))
    np.testing.assert_array_equal(restored.integers(0, 2**62, 50), gen.integers(0, 2**62, 50))


def test_rng_from_bad_array_raises():
    with pytest.raises(ValueError, match="uint8"):
        rng_from_state_array(np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="not JSON"):
        rng_from_state_array(np.frombuffer(b"{oops", dtype=np.uint8))
    with pytest.raises(ValueError, match="bit generator 'Evil'"):
        rng_from_state_array(np.frombuffer(b'{"bit_generator": "Evil"}', dtype=np.uint8))
