"""`bench flops` and `bench latency` with channel densities: the counts of the narrowed tensors, files, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgecl.bench import bench_cli
from edgecl.bench.channel_bench import parse_densities
from edgecl.bench.flops_report import flops_report
from edgecl.bench.latency import LatencyConfig, measure_latency
from edgecl.runtime.flops import SparsityConfig, training_flops

pytestmark = pytest.mark.torch

S2 = ("cnn-s2", (1, 28, 28))
# cnn-s2's layers: 0 Conv2d(1, 16), 2 Conv2d(16, 32), 6 Linear(1568, 64), 8 Linear(64, 10); sets 0, 2, 6
S2_HALF = {"0.weight": 0.5, "2.weight": 0.25, "6.weight": 0.25, "8.weight": 0.5}


def _steps(report):
    return report.flops.step.to_dict()


@pytest.fixture(scope="module")
def structured(tmp_path_factory):
    """A channel-structured portable export of cnn-s2 (seed 0) and a saved engine state with half its channels."""
    torch = pytest.importorskip("torch")
    from edgecl.exporters import export
    from edgecl.exporters.models import build_model
    from edgecl.runtime import open_engine
    from edgecl.runtime.channel_sparcl import ChannelMasks

    root = tmp_path_factory.mktemp("channel-bench")
    net = build_model(*S2, 10, seed=0)
    folder = export(net, torch.zeros(2, *S2[1]), root / "structured", structure="channel").folder
    export(net, torch.zeros(2, *S2[1]), root / "dense")
    engine = open_engine(folder)
    chosen = ChannelMasks(engine, 0.5).initial(np.random.default_rng(0))
    state = engine.save(root / "state.npz")
    return folder, root / "dense", state, chosen


def test_half_density_counts_the_narrowed_products_by_hand():
    """conv2's rows and columns both halve: 0.25 of its products; the stem and classifier lose one side only."""
    dense, half = flops_report(*S2), flops_report(*S2, channel_density=0.5)
    assert half.computed == S2_HALF
    for d, h in zip(dense.flops.step.layers, half.flops.step.layers):
        assert h.forward == pytest.approx(d.forward * S2_HALF[d.weight])
        assert h.weight_grad == pytest.approx(d.weight_grad * S2_HALF[d.weight])
    assert half.channels.active == {"0": 8, "2": 16, "6": 32}
    expected = training_flops(half.layers, 32, S2_HALF, S2_HALF)
    assert half.flops.step.forward + half.flops.step.backward == pytest.approx(expected.total)


def test_full_density_is_the_dense_count():
    assert _steps(flops_report(*S2, channel_density=1.0)) == _steps(flops_report(*S2))
    run = dict(batch=16, replay=32, epochs=2, tasks=3)
    assert flops_report(*S2, channel_density=1.0, **run).flops.to_dict() == flops_report(*S2, **run).flops.to_dict()


def test_a_depthwise_layer_counts_whole():
    report = flops_report("mobilenet", (1, 8, 8), channel_density=0.5)
    depthwise = [r["weight"] for r in report.layers if r["groups"] > 1]
    assert depthwise and all(report.computed[w] == 1.0 for w in depthwise)


def test_file_and_uniform_density_agree(structured, tmp_path):
    folder, _, state, chosen = structured
    half = _steps(flops_report(*S2, channel_density=0.5))
    assert _steps(flops_report(*S2, channels=state)) == half  # Engine.save's npz
    as_json = tmp_path / "channels.json"
    as_json.write_text(json.dumps({s: [int(i) for i in v] for s, v in chosen.items()}))
    assert _steps(flops_report(*S2, channels=as_json)) == half
    assert _steps(flops_report(artifacts=folder, channel_density=0.5)) == half  # the manifest's plan
    some = tmp_path / "some.json"  # sets a file leaves out stay full
    some.write_text(json.dumps({"2": list(range(16))}))
    assert flops_report(*S2, channels=some).computed == {"0.weight": 1.0, "2.weight": 0.5, "6.weight": 0.5,
                                                         "8.weight": 1.0}


@pytest.mark.parametrize("text, words", [("0", "--channel-density 0.0"), ("1.5", "--channel-density 1.5"),
                                         ("0.5,x", "'0.5,x'"), ("0.5,0.5", r"\[0.5, 0.5\]")])
def test_bad_density_text_is_refused(text, words):
    with pytest.raises(ValueError, match=words):
        parse_densities(text)


@pytest.mark.parametrize("d", [0.0, -0.5, 1.5, float("nan")])
def test_flops_refuses_a_density_outside_the_unit_interval(d):
    with pytest.raises(ValueError, match=r"channel_density=.*accepted: numbers in \(0, 1\]"):
        flops_report(*S2, channel_density=d)


def _json(tmp_path, data, name="c.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("data, words", [({"nope": [0]}, "'nope': no such channel set; accepted: 0, 2, 6"),
                                         ({"2": [3, 40]}, r"holds 40; accepted: indices in \[0, 32\)"),
                                         ({"2": [3, 1]}, "unsorted"), ({"2": []}, "non-empty"),
                                         ({"2": [0.5]}, "integer"), ([1, 2], "not {set: \\[indices\\]}")])
def test_bad_channels_files_are_refused_naming_the_file(tmp_path, data, words):
    path = _json(tmp_path, data)
    with pytest.raises(ValueError, match=words) as e:
        flops_report(*S2, channels=path)
    assert str(path) in str(e.value)


def test_an_engine_state_of_another_model_is_refused(structured):
    *_, state, _ = structured
    with pytest.raises(ValueError, match=r"state of another model: it has weight shape \(64, 1568\) for '6.weight' "
                                         r"\(this model's is \(64, 288\)\)"):
        flops_report("cnn-s2", (1, 12, 12), channels=state)


def test_a_dense_engine_state_and_other_files_are_refused(structured, tmp_path):
    from edgecl.runtime import open_engine

    dense = open_engine(structured[1]).save(tmp_path / "dense.npz")
    with pytest.raises(ValueError, match="no channels::<set> arrays"):
        flops_report(*S2, channels=dense)
    for path, words in ((tmp_path / "missing.npz", "is not a file"), (_json(tmp_path, {}, "c.txt"), "ends in '.txt'"),
                        (_json(tmp_path, {}, "bad.npz"), "unreadable")):
        with pytest.raises(ValueError, match=words):
            flops_report(*S2, channels=path)


def test_flops_refusals(structured, tmp_path):
    with pytest.raises(ValueError, match="not a channel-structured export"):
        flops_report(artifacts=structured[1], channel_density=0.5)
    with pytest.raises(ValueError, match="sparsity 0.5 .* with channel densities"):
        flops_report(*S2, sparsity=SparsityConfig(0.5), channel_density=0.5)
    with pytest.raises(ValueError, match="one or the other"):
        flops_report(*S2, channel_density=0.5, channels=structured[2])


POOLED = """
from torch import nn

def build():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 10))
"""


def test_a_model_that_cannot_be_channel_structured_is_refused_before_any_export(tmp_path):
    from edgecl.runtime.errors import UnsupportedModelError

    (tmp_path / "pooled.py").write_text(POOLED)
    model = f"{tmp_path / 'pooled.py'}:build"
    with pytest.raises(UnsupportedModelError, match="AvgPool2d; accepted"):
        flops_report(model, (1, 8, 8), channel_density=0.5)
    cache = tmp_path / "cache"
    with pytest.raises(UnsupportedModelError, match=f"channel density for model '{model}'.*AvgPool2d"):
        measure_latency(LatencyConfig(model, (1, 8, 8), channel_density=(0.5,), repeats=1, warmup=0), cache)
    assert not cache.exists()  # nothing exported


@pytest.mark.parametrize("kw, words", [
    ({"engines": ("ort-training",)}, r"engines=\['ort-training'\] with channel_density: only the portable engine"),
    ({"engines": ("portable", "torch")}, "only the portable engine"),
    ({"phases": ("train", "cold_start")}, "cold starts are not timed"),
    ({"device": "raspberry-pi-5"}, "measured on the host"),
    ({"channel_density": (0.5, 0.0)}, r"channel_density=0.0; accepted: numbers in \(0, 1\]"),
    ({"channel_density": ()}, "one or more distinct"),
])
def test_latency_refuses_what_channels_cannot_go_with(kw, words):
    with pytest.raises(ValueError, match=words):
        LatencyConfig(**{"model": "cnn-s2", "input_shape": (1, 8, 8), "channel_density": (0.5,), **kw})


def test_latency_refuses_channels_with_artifacts(structured):
    with pytest.raises(ValueError, match="with artifacts="):
        LatencyConfig(artifacts=str(structured[0]), channel_density=(0.5,))


def test_latency_rows_per_density_and_file_with_the_counted_ratio(structured, tmp_path, exports):
    *_, chosen = structured
    path = _json(tmp_path, {s: [int(i) for i in v] for s, v in chosen.items()})
    config = LatencyConfig("cnn-s2", (1, 28, 28), batch=4, threads=1, repeats=3, warmup=1,
                           channel_density=(1.0, 0.5), channels=str(path))
    assert config.engines == ("portable",) and config.phases == ("train", "infer")
    result = measure_latency(config, exports)
    assert [(r.engine, r.phase) for r in result.rows] == [("portable", "train"), ("portable", "infer")]
    rows = {(r.graph, r.phase): r for r in result.channels}
    assert set(rows) == {(g, p) for g in ("channels 1", "channels 0.5", "channels c.json") for p in ("train", "infer")}
    dense, half = (flops_report(*S2, batch=4, examples_per_epoch=4, channel_density=d).flops.step for d in (1.0, 0.5))
    for graph in ("channels 0.5", "channels c.json"):
        assert rows[graph, "train"].flops_ratio == pytest.approx(half.total / dense.total)
        assert rows[graph, "infer"].flops_ratio == pytest.approx(half.forward / dense.forward)
        assert rows[graph, "train"].active == {"0": 8, "2": 16, "6": 32}
    assert rows["channels 1", "train"].flops_ratio == 1.0
    for r in result.channels:
        assert r.ratio_to_dense == pytest.approx(r.median_ms / result.row("portable", r.phase).median_ms)
    d = result.to_dict()
    assert len(d["channels"]) == 6 and len(d["load_average"]) == 2 and d["channel_density"] == [1.0, 0.5]


def test_cli_flops_and_latency(capsys, exports):
    assert bench_cli.main(["flops", "--model", "cnn-s2", "--input-shape", "1x28x28", "--channel-density", "0.5",
                           "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["channels"]["computed_density"] == S2_HALF and out["channels"]["density"] == 0.5
    assert bench_cli.main(["flops", "--model", "cnn-s2", "--input-shape", "1x28x28", "--channel-density", "0.5"]) == 0
    assert "active channels density 0.5 of every set: 0 8/16, 2 16/32, 6 32/64" in capsys.readouterr().out
    assert bench_cli.main(["latency", "--model", "cnn-s2", "--input-shape", "1x28x28", "--channel-density", "1,0.25",
                           "--batch", "4", "--threads", "1", "--repeats", "3", "--warmup", "1", "--phases", "train",
                           "--cache", str(exports)]) == 0
    out = capsys.readouterr().out
    assert "channels 0.25" in out and "FLOPs vs dense" in out
    assert bench_cli.main(["latency", "--model", "cnn-s2", "--channel-density", "1.5"]) == 2
    assert "--channel-density 1.5; accepted: numbers in (0, 1]" in capsys.readouterr().err
    assert bench_cli.main(["latency", "--model", "cnn-s2", "--channel-density", "0.5", "--engines", "ort-training"]) == 2
    assert "--engines" in capsys.readouterr().err
    assert bench_cli.main(["latency", "--model", "cnn-s2", "--channels", "c.json", "--csv"]) == 2
    assert "--csv with --channels" in capsys.readouterr().err
    assert bench_cli.main(["flops", "--model", "cnn-s2", "--channel-density", "2"]) == 2
    assert "--channel-density: channel_density=2.0" in capsys.readouterr().err
