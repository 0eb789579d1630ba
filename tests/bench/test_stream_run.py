"""`bench stream`: the online learner on a class-incremental digits stream, through the function and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgecl.bench.bench_cli import main
from edgecl.bench.stream_run import (DATA_LR, StreamConfig, buffer_capacity, per_class_subset, run_stream,
                                     stream_groups)
from edgecl.runtime.buffer import bytes_per_example
from edgecl.runtime.dataset import Dataset

SMALL = dict(data="digits", seeds=(0,))  # 1 438 samples, ~330 groups: about a second a method


@pytest.fixture(scope="module")
def small_run(exported):
    _, folder = exported("cnn")
    return folder, run_stream(StreamConfig(**SMALL), folder, progress=False)


def test_stream_groups_present_every_example_once_in_groups_of_lo_to_hi():
    sizes = [50, 7, 33]
    tasks = stream_groups(sizes, (2, 5), np.random.default_rng(0))
    for n, groups in zip(sizes, tasks):
        assert sorted(np.concatenate(groups).tolist()) == list(range(n))
        assert all(2 <= len(g) <= 5 for g in groups[:-1]) and 1 <= len(groups[-1]) <= 5
    again = stream_groups(sizes, (2, 5), np.random.default_rng(0))
    assert all(np.array_equal(a, b) for ta, tb in zip(tasks, again) for a, b in zip(ta, tb))
    other = stream_groups(sizes, (2, 5), np.random.default_rng(1))
    assert not all(len(ta) == len(tb) and all(np.array_equal(a, b) for a, b in zip(ta, tb))
                   for ta, tb in zip(tasks, other))
    ones = stream_groups([9], (1, 1), np.random.default_rng(0))[0]
    assert [len(g) for g in ones] == [1] * 9


def test_per_class_subset_keeps_at_most_n_of_each_class_in_order():
    y = np.array([0, 1, 0, 0, 1, 2, 0])
    data = Dataset("d", np.arange(7, dtype=np.float32).reshape(7, 1, 1, 1), y, 3)
    sub = per_class_subset(data, 2, np.random.default_rng(0))
    assert np.bincount(sub.y, minlength=3).tolist() == [2, 2, 1]
    assert np.all(np.diff(sub.x.ravel()) > 0)  # original order
    assert np.array_equal(sub.y, y[sub.x.ravel().astype(int)])


@pytest.mark.parametrize("field, value, needle", [
    ("data", "cifar", "data='cifar'"), ("methods", ("er", "joint"), "methods="), ("methods", ("er", "er"), "methods="),
    ("seeds", (), "seeds="), ("seeds", (-1,), r"seeds=\[-1\]"), ("group", (0, 4), "group="), ("group", (5, 2), "group="),
    ("class_order", "random", "class_order="), ("train_per_class", 0, "train_per_class="),
    ("buffer_bytes", "8 parsecs", "buffer_bytes="), ("buffer_bytes", 10, "buffer_bytes="), ("lr", -1.0, "lr="),
    ("replay_steps", -1, "replay_steps="), ("threads", 0, "threads="), ("sparsity", 1.0, "sparsity="),
])
def test_a_bad_setting_is_refused_naming_it(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        StreamConfig(**{field: value})


def test_the_default_learning_rates_are_edgecl_runs():
    from edgecl.bench.cl_run import DATA_DEFAULTS

    assert DATA_LR == {data: d["lr"] for data, d in DATA_DEFAULTS.items()}
    assert StreamConfig(data="fashion-mnist").learning_rate == 0.03 and StreamConfig(lr=0.2).learning_rate == 0.2


def test_each_method_sees_the_same_stream_once_and_replay_beats_fine_tuning(small_run):
    _, result = small_run
    runs = {r.method: r for r in result.runs}
    assert set(runs) == {"finetune", "er", "derpp", "sparcl-derpp"}
    n = 1438  # digits' training split (80 %)
    assert {r.samples for r in runs.values()} == {n} and len({r.calls for r in runs.values()}) == 1
    assert n / 8 <= runs["er"].calls <= n / 2  # groups of 1..8, about 4.5 on average
    assert all(r.steps == r.calls for r in runs.values())  # one step per group, no replay-only steps
    # class-incremental without replay: only the last task's classes are predicted
    assert runs["finetune"].final_acc < 0.3
    for m in ("er", "derpp", "sparcl-derpp"):
        assert runs[m].final_acc > runs["finetune"].final_acc + 0.25, (m, runs[m].final_acc)
    for r in runs.values():
        assert all(v is None for t, row in enumerate(r.acc_matrix) for v in row[t + 1:])
        assert all(0 <= v <= 1 for t, row in enumerate(r.acc_matrix) for v in row[: t + 1])
        assert r.seen_acc[0] == r.acc_matrix[0][0] and r.learn_s > 0 and r.call_ms_p90 >= r.call_ms_median > 0


def test_buffers_hold_what_the_bytes_allow(small_run):
    _, result = small_run
    runs = {r.method: r for r in result.runs}
    budget = 8 * 2**20
    assert runs["er"].buffer_capacity == budget // bytes_per_example((1, 8, 8), 10, store_logits=False)
    assert runs["derpp"].buffer_capacity == runs["sparcl-derpp"].buffer_capacity == \
        budget // bytes_per_example((1, 8, 8), 10, store_logits=True)
    assert runs["finetune"].buffer_capacity == 0
    assert buffer_capacity(StreamConfig(buffer_bytes="3KiB"), "derpp", (1, 8, 8), 10) == 3072 // 306


def test_the_summary_and_the_paired_ratio(small_run):
    _, result = small_run
    d = result.to_dict()
    assert [row["method"] for row in d["summary"]] == ["finetune", "er", "derpp", "sparcl-derpp"]
    sparcl = d["summary"][3]
    assert sparcl["label"] == "SparCL-DER++ 0.75" and len(sparcl["seen_acc"]) == 5
    assert sparcl["final_acc"]["values"] == [result.of("sparcl-derpp")[0].final_acc] and sparcl["final_acc"]["std"] == 0
    ratio = d["sparcl_derpp_over_derpp_learn_s"]["values"][0]
    assert ratio == result.of("sparcl-derpp")[0].learn_s / result.of("derpp")[0].learn_s
    assert d["task_classes"] == {0: [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]}
    json.dumps(d)


def test_a_seeded_class_order_and_the_same_seed_twice(exported):
    _, folder = exported("cnn")
    config = StreamConfig(data="digits", methods=("er",), seeds=(3,), class_order="seeded", train_per_class=20)
    a, b = (run_stream(config, folder, progress=False) for _ in range(2))
    classes = a.task_classes[3]
    assert sorted(c for task in classes for c in task) == list(range(10)) and classes != [[0, 1], [2, 3], [4, 5],
                                                                                         [6, 7], [8, 9]]
    assert a.runs[0].acc_matrix == b.runs[0].acc_matrix and a.runs[0].final_acc == b.runs[0].final_acc


def test_artifacts_of_another_input_are_refused_before_any_run(exported):
    _, folder = exported("cnn")
    with pytest.raises(ValueError, match=r"take \(1, 8, 8\).*\(1, 28, 28\)"):
        run_stream(StreamConfig(data="fashion-mnist", seeds=(0,), train_per_class=1), folder, progress=False)
    with pytest.raises(ValueError, match=r"buffer_bytes='200B' holds no example of \(1, 8, 8\) for er; accepted: at "
                       "least 266 bytes"):
        run_stream(StreamConfig(data="digits", methods=("er",), seeds=(0,), buffer_bytes="200B"), folder)
    with pytest.raises(ValueError, match=r"no artifacts for seeds \[1\]"):
        run_stream(StreamConfig(**{**SMALL, "seeds": (0, 1)}), {0: folder}, progress=False)


def test_the_cli_prints_the_table_and_writes_json_and_a_plot(exported, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _, folder = exported("cnn")
    out = tmp_path / "res" / "stream.json"
    code = main(["stream", "--artifacts", str(folder), "--seeds", "0", "--methods", "finetune,er", "--group", "2-4",
                 "--train-per-class", "20", "--replay-steps", "1", "--json", str(out), "--plot",
                 str(tmp_path / "stream.png"), "--quiet"])
    text = capsys.readouterr().out
    assert code == 0
    lines = text.splitlines()
    assert any(line.startswith("Fine-tune ") for line in lines) and any(line.startswith("ER ") for line in lines)
    assert "groups of 2-4 samples" in text and "replay_steps 1" in text and "SparCL-DER++" not in text
    d = json.loads(out.read_text())
    assert d["config"]["group"] == [2, 4] and d["config"]["replay_steps"] == 1 and d["config"]["lr"] == 0.1
    er = next(r for r in d["runs"] if r["method"] == "er")
    ft = next(r for r in d["runs"] if r["method"] == "finetune")
    assert er["steps"] == 2 * er["calls"] and ft["steps"] == ft["calls"]  # one replay-only step after each (ER only)
    assert er["samples"] == 200 and (tmp_path / "stream.png").stat().st_size > 0


def test_the_cli_refuses_bad_flags_before_any_work(capsys, tmp_path):
    assert main(["stream", "--group", "8-1", "--out", str(tmp_path / "never")]) == 2
    assert "group=(8, 1)" in capsys.readouterr().err
    assert main(["stream", "--group", "a-b"]) == 2
    assert "--group 'a-b'" in capsys.readouterr().err
    assert main(["stream", "--plot", str(tmp_path / "p.svg")]) == 2
    assert "--plot" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


@pytest.mark.torch
def test_the_cli_exports_the_seed_s_model_in_another_process(tmp_path, capsys):
    code = main(["stream", "--seeds", "0", "--methods", "er", "--train-per-class", "10", "--out", str(tmp_path),
                 "--json", str(tmp_path / "s.json"), "--quiet"])
    assert code == 0 and "ER " in capsys.readouterr().out
    exports = [p for p in (tmp_path / "artifacts").iterdir() if (p / "manifest.json").is_file()]
    assert [p.name.startswith("cnn-portable-") for p in exports] == [True]


RUNTIME_ONLY = textwrap.dedent("""
    import json, sys

    class NoTorch:  # any `import torch` raises ImportError (sys.modules["torch"] = None trips scipy, for digits)
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torch":
                raise ImportError("torch is blocked here")

    sys.meta_path.insert(0, NoTorch())
    from edgecl.bench.stream_run import StreamConfig, run_stream
    config = StreamConfig(data="digits", methods=("derpp", "sparcl-derpp"), seeds=(0,), train_per_class=10)
    result = run_stream(config, sys.argv[1], progress=False)
    print(json.dumps({"torch_loaded": result.torch_loaded, "samples": [r.samples for r in result.runs]}))
""")


def test_the_stream_runs_where_torch_cannot_be_imported(exported):
    _, folder = exported("cnn")
    out = subprocess.run([sys.executable, "-c", RUNTIME_ONLY, str(folder)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"torch_loaded": False, "samples": [100, 100]}
