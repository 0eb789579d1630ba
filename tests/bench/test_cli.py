"""The two console scripts, through their library functions and as commands."""

from __future__ import annotations

import json
import numpy as np
import pytest

from edgecl.bench import bench_cli, edgecl_cli
from edgecl.bench.quickstart import main_job, train_from_artifacts
from edgecl.runtime.data import Dataset, load_npz, save_npz


def test_export_then_train_in_a_process_without_torch_learns(tmp_path):
    result = main_job(tmp_path, steps=60)  # exports on the host, trains in a fresh torch-free process
    assert result.engine == "portable"
    assert result.torch_loaded is False
    assert len(result.losses) == 60
    assert np.mean(result.losses[-10:]) < np.mean(result.losses[:10])
    assert result.accuracy_after > result.accuracy_before


def test_export_then_train_subcommands(tmp_path, capsys):
    assert edgecl_cli.main(["export", "--model", "mlp", "--engine", "ort-training", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "training_model.onnx" in out and "head: 10 classes, labels 0..9" in out
    assert edgecl_cli.main(["train", str(tmp_path / "a"), "--steps", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["engine"] == "ort-training" and len(result["losses"]) == 5


def test_train_reports_bad_input_without_traceback(tmp_path, capsys):
    assert edgecl_cli.main(["train", str(tmp_path / "missing")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="steps=0"):
        train_from_artifacts(tmp_path, steps=0)


def test_npz_data_round_trip_and_errors(tmp_path):
    data = Dataset("toy", np.zeros((4, 1, 2, 2), np.float32), np.arange(4), 4)
    save_npz(data, tmp_path / "d.npz")
    back = load_npz(tmp_path / "d.npz")
    assert back.name == "toy" and back.num_classes == 4 and np.array_equal(back.y, data.y)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_npz(tmp_path / "nope.npz")
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 1, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"lacks arrays \['y'\]"):
        load_npz(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_npz(tmp_path / "junk.npz")


def test_bench_step_reports_every_engine(capsys):
    assert bench_cli.main(["step", "--model", "mlp", "--repeats", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["median_ms"]) == {"torch", "portable", "ort-training"}
    assert result["ratio_to_torch"]["torch"] == 1.0
    assert all(v > 0 for v in result["median_ms"].values())
