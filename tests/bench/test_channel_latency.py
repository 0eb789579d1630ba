"""The paired step-time benchmark of one structured export at several channel densities."""

from __future__ import annotations

import numpy as np
import pytest

from edgecl.bench.channel_latency import active_channels, format_table, measure_channel_latency


def test_active_channels_keep_a_share_of_every_set_sorted_and_at_least_one():
    out = active_channels({"a": 16, "b": 3}, 0.25, np.random.default_rng(0))
    assert len(out["a"]) == 4 and len(out["b"]) == 1
    assert (np.diff(out["a"]) > 0).all() and out["a"].dtype == np.int64


def test_measure_times_every_density_against_the_dense_graph():
    pytest.importorskip("torch")
    r = measure_channel_latency("cnn-s2", (1, 8, 8), batch=4, threads=1, densities=(1.0, 0.5), repeats=3, warmup=1)
    assert set(r.structured_ms) == {1.0, 0.5} and r.dense_ms > 0
    assert set(r.to_dict()["ratio_to_dense"]) == {1.0, 0.5}
    assert "channels 0.5" in format_table(r)


@pytest.mark.parametrize("kw, words", [({"densities": (0.0,)}, "densities=(0.0,)"), ({"repeats": 2}, "repeats=2")])
def test_bad_settings_are_refused(kw, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        measure_channel_latency(**kw)
