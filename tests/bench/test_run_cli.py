"""`edgecl run` end to end: results table, JSON, plot, budget refusal, and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

RUN = [sys.executable, "-m", "edgecl.bench.edgecl_cli", "run", "--epochs", "3", "--threads", "1", "--quiet"]
EXACT_KEYS = ("acc_matrix", "task_il_matrix", "acc", "bwt", "forgetting", "fwt", "train_flops", "dense_train_flops",
              "steps")


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("run-out")


@pytest.fixture(scope="module")
def uninterrupted(out_dir):
    path = out_dir / "new-folder" / "plain.json"  # --json and --plot create their folders
    plot = out_dir / "plots" / "plot.png"
    proc = subprocess.run(RUN + ["--out", str(out_dir), "--json", str(path), "--plot", str(plot)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(path.read_text())


def test_run_prints_table_and_writes_json_and_plot(uninterrupted, out_dir):
    stdout, result = uninterrupted
    assert "ACC (class-IL)" in stdout and "training FLOPs" in stdout
    for key in ("acc_matrix", "acc", "bwt", "forgetting", "train_flops", "dense_train_flops", "peak_rss_bytes",
                "budget_plan", "wall_s", "config"):
        assert key in result, key
    assert np.array(result["acc_matrix"]).shape == (5, 5)
    assert result["train_flops"] < result["dense_train_flops"]
    assert result["peak_rss_bytes"] > 0
    assert (out_dir / "plots" / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_too_small_budget_is_refused_with_the_needed_bytes(out_dir):
    proc = subprocess.run(RUN + ["--out", str(out_dir), "--budget", "64KiB"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2
    assert "needs at least" in proc.stderr and "bytes" in proc.stderr
    proc = subprocess.run(RUN + ["--out", str(out_dir), "--budget", "lots"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2 and "lots" in proc.stderr


@pytest.mark.parametrize("option, value, message", [
    ("--plot", "plot.txt", "suffix '.txt'; accepted: "),
    ("--plot", "plot.pgf", "suffix '.pgf'; accepted: "),  # matplotlib lists it, but it needs LaTeX
    ("--json", ".", "is a folder; accepted: a file path"),
])
def test_bad_output_paths_are_refused_before_any_training(tmp_path, option, value, message):
    proc = subprocess.run(RUN + ["--out", str(tmp_path / "out"), option, str(tmp_path / value)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before the export, let alone the run


def test_resume_after_sigkill_gives_exactly_the_uninterrupted_metrics(uninterrupted, out_dir, tmp_path):
    _, plain = uninterrupted
    ckpt = tmp_path / "ckpt"
    args = RUN + ["--out", str(out_dir), "--checkpoint", str(ckpt), "--checkpoint-every", "5",
                  "--json", str(tmp_path / "resumed.json")]
    rng = np.random.default_rng(0)
    kills = 0
    for _ in range(3):  # kill it at a random moment once it has checkpointed, three times
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while not (ckpt / "LATEST").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(float(rng.uniform(0.0, 0.6)))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1, "the run finished before it could be killed; make it longer"
    final = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["resumed"] is True
    for key in EXACT_KEYS:
        assert resumed[key] == plain[key], key


def test_corrupt_checkpoint_falls_back_to_the_previous_good_one(out_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    args = RUN + ["--out", str(out_dir), "--checkpoint", str(ckpt), "--checkpoint-every", "5"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    latest = ckpt / (ckpt / "LATEST").read_text().strip()
    part = latest / "engine.npz"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "engine.npz" in again.stderr  # the warning names the corrupt file
