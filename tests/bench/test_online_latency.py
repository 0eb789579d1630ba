"""`bench online`: per-call latency of the online learner's learn and predict, through the function and the CLI."""

from __future__ import annotations

import json

import pytest

from edgecl.bench.bench_cli import main
from edgecl.bench.online_latency import OnlineLatencyConfig, format_table, measure_online_latency, open_filled

FAST = dict(repeats=3, warmup=1, threads=1)


def test_one_row_per_method_and_call_and_the_learners_kept_learning(exported, tmp_path):
    _, folder = exported("cnn")
    config = OnlineLatencyConfig(methods=("finetune", "derpp", "sparcl-derpp"), **FAST)
    result = measure_online_latency(folder, config)
    assert [(r.method, r.call) for r in result.rows] == [(m, c) for m in config.methods
                                                         for c in ("learn(1)", "learn(8)", "predict(1)")]
    assert all(r.repeats == 3 and r.p90_ms >= r.median_ms > 0 for r in result.rows)
    assert result.row("derpp", "learn(8)").samples == 8 and result.model == folder.name
    assert result.buffer_capacity["finetune"] == 0 and result.buffer_capacity["derpp"] > 0
    assert result.input_shape == (1, 8, 8)
    table = format_table(result)
    assert "SparCL-DER++ 0.75" in table and "learn(1)" in table and "predict(1)" in table
    json.dumps(result.to_dict())
    with pytest.raises(KeyError, match="no row for 'er'"):
        result.row("er", "learn(1)")


def test_a_filled_learner_replays_full_batches_from_its_first_timed_call(exported, tmp_path):
    _, folder = exported("cnn")
    config = OnlineLatencyConfig(methods=("derpp",), replay_batch=16, **FAST)
    learner = open_filled(folder, tmp_path / "state", "derpp", config)
    try:
        assert learner.samples_seen == 32 and len(learner.buffer) >= 16  # 2 * replay_batch learnt in calls of 8
        assert learner.learner.step == 4
    finally:
        learner.close()


@pytest.mark.parametrize("field, value, needle", [
    ("methods", ("joint",), "methods="), ("learn_sizes", (0,), "learn_sizes="), ("learn_sizes", (8, 8), "learn_sizes="),
    ("repeats", 2, "repeats="), ("warmup", -1, "warmup="), ("fill", -1, "fill="), ("threads", 0, "threads="),
    ("seed", -1, "seed=-1"),
])
def test_a_bad_setting_is_refused_naming_it(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        OnlineLatencyConfig(**{field: value})
    with pytest.raises(ValueError, match="both empty"):
        OnlineLatencyConfig(learn_sizes=(), predict_sizes=())


def test_the_cli_prints_json_of_the_users_export(exported, capsys):
    _, folder = exported("cnn")
    code = main(["online", "--artifacts", str(folder), "--methods", "er", "--learn-sizes", "2", "--predict-sizes",
                 "1,4", "--repeats", "3", "--warmup", "0", "--threads", "1", "--json"])
    assert code == 0
    d = json.loads(capsys.readouterr().out)
    assert [(r["method"], r["call"]) for r in d["rows"]] == [("er", "learn(2)"), ("er", "predict(1)"),
                                                             ("er", "predict(4)")]
    assert d["config"]["threads"] == 1 and d["input_shape"] == [1, 8, 8]


def test_the_cli_refuses_bad_flags(exported, capsys):
    _, folder = exported("cnn")
    assert main(["online", "--artifacts", str(folder), "--model", "cnn"]) == 2
    assert "--model with --artifacts" in capsys.readouterr().err
    assert main(["online", "--artifacts", str(folder), "--learn-sizes", "1,x"]) == 2
    assert "--learn-sizes '1,x'" in capsys.readouterr().err
    assert main(["online", "--artifacts", str(folder), "--replay-batch", "0"]) == 2
    assert "--replay-batch: replay_batch=0" in capsys.readouterr().err
