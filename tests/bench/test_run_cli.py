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


# --- the results table ---------------------------------------------------------------------------


def test_the_table_shows_a_dash_for_tasks_not_yet_trained():
    """Issue 11: the upper triangle (tasks not trained yet) printed as 0.0."""
    from edgecl.bench.cl_run import format_result
    from edgecl.runtime.loop import RunResult

    r = [[0.98, 0.0, 0.0], [0.5, 0.96, 0.0], [0.4, 0.45, 0.97]]
    result = RunResult(acc_matrix=r, task_il_matrix=r, acc=0.6, task_il_acc=0.6, bwt=-0.5, forgetting=0.5, fwt=0.0,
                       train_flops=1.0, dense_train_flops=2.0, steps=10, peak_rss_bytes=None, wall_s=1.0,
                       resumed=False, config={"label": "DER++"})
    rows = [line.split() for line in format_result(result).splitlines() if line.startswith("task")]
    assert rows == [["task1", "98.0", "-", "-"], ["task2", "50.0", "96.0", "-"], ["task3", "40.0", "45.0", "97.0"]]


# --- folders refused up front ------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--checkpoint", "--out"])
def test_a_file_as_a_folder_argument_is_refused_before_any_work(tmp_path, option):
    """Issue 11: `--checkpoint f` trained a task, then FileExistsError; `--out f` gave a traceback."""
    (tmp_path / "f").write_text("mine")
    proc = subprocess.run(RUN + ["--out", str(tmp_path / "out"), option, str(tmp_path / "f")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{option}: {option[2:]}='{tmp_path / 'f'}' is a file; accepted: a folder" in proc.stderr
    assert (tmp_path / "f").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


# --- resuming: the same settings or none -------------------------------------------------------


def snapshot(root) -> dict:
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def finished(out_dir, tmp_path_factory):
    """A checkpoint folder and the JSON of a run that went to its end."""
    folder = tmp_path_factory.mktemp("finished")
    proc = subprocess.run(RUN + ["--out", str(out_dir), "--checkpoint", str(folder / "ck"), "--checkpoint-every", "10",
                                 "--json", str(folder / "a.json")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder / "ck", json.loads((folder / "a.json").read_text())


@pytest.mark.parametrize("flags, difference", [
    (["--epochs", "4"], "epochs: 3 in the checkpoint, 4 now"),
    (["--lr", "0.01"], "lr: 0.1 in the checkpoint, 0.01 now"),
    (["--seed", "1"], "seed: 0 in the checkpoint, 1 now"),
    (["--sparsity", "0.9"], "sparsity: 0.75 in the checkpoint, 0.9 now"),
    (["--dense"], "sparsity: 0.75 in the checkpoint, None now"),
    (["--batch", "16"], "batch_size: 32 in the checkpoint, 16 now"),
    (["--threads", "2"], "threads: 1 in the checkpoint, 2 now"),
    (["--epochs", "5", "--lr", "0.01"], "epochs: 3 in the checkpoint, 5 now; lr: 0.1 in the checkpoint, 0.01 now"),
])
def test_resuming_under_other_settings_is_refused_naming_them_and_changes_nothing(finished, out_dir, tmp_path, capsys,
                                                                                 flags, difference):
    """Issue 11: "(resumed)", rc 0, and a JSON with the new settings over the old run's metrics."""
    from edgecl.bench.edgecl_cli import main

    ckpt, _ = finished
    before, artifacts = snapshot(ckpt), sorted((out_dir / "artifacts").iterdir())
    rc = main(RUN[3:] + ["--out", str(out_dir), "--checkpoint", str(ckpt), "--checkpoint-every", "10",
                         "--json", str(tmp_path / "b.json")] + flags)
    err = capsys.readouterr().err
    assert rc == 2 and "was written by a run with other settings: " + difference + "; accepted: the same" in err
    assert snapshot(ckpt) == before and not (tmp_path / "b.json").exists()
    assert sorted((out_dir / "artifacts").iterdir()) == artifacts  # refused before the export, too


def test_resuming_with_another_checkpoint_cadence_is_the_same_run(finished, out_dir, tmp_path):
    ckpt, first = finished
    proc = subprocess.run(RUN + ["--out", str(out_dir), "--checkpoint", str(ckpt), "--checkpoint-every", "7",
                                 "--json", str(tmp_path / "b.json")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "(resumed)" in proc.stdout, proc.stderr[-3000:]
    again = json.loads((tmp_path / "b.json").read_text())
    for key in EXACT_KEYS:
        assert again[key] == first[key], key
    assert {k: v for k, v in again["config"]["job"].items() if k != "checkpoint_every"} == {
        k: v for k, v in first["config"]["job"].items() if k != "checkpoint_every"}


HOLDER = ("import sys\nfrom edgecl.runtime.checkpoint import CheckpointWriter\n"
          "with CheckpointWriter(sys.argv[1]):\n    print('locked', flush=True)\n    sys.stdin.readline()\n")


def test_a_second_run_on_a_checkpoint_folder_in_use_is_refused_naming_it(out_dir, tmp_path):
    """Issue 11: two runs on one folder: one died (Directory not empty) as each pruned the other's temp folder."""
    ckpt = tmp_path / "ck"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(ckpt)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        fresh = tmp_path / "fresh-out"
        proc = subprocess.run(RUN + ["--out", str(fresh), "--checkpoint", str(ckpt)], capture_output=True,
                              text=True, timeout=600)
    finally:
        holder.communicate("\n", timeout=30)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"checkpoint folder '{ckpt}' is in use: another process writes into it" in proc.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == [".lock"]
    assert not fresh.exists()  # refused before the export, not after it


# --- channel-structured SparCL and the narrower dense baseline (issue 13) ------------------------


def test_a_channel_structured_run_counts_the_narrowed_work(tmp_path):
    path = tmp_path / "ch.json"
    proc = subprocess.run(RUN[:4] + ["--epochs", "1", "--threads", "1", "--quiet", "--model", "cnn-s2",
                                      "--structure", "channel", "--sparsity", "0.5", "--out", str(tmp_path / "out"),
                                      "--json", str(path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(path.read_text())
    assert result["config"]["label"] == "SparCL-DER++ 0.50 channel"
    assert result["config"]["job"]["structure"] == "channel"
    # half of every channel set: the middle conv and the first Linear compute a quarter, the stem and head a half
    assert 3.0 < result["dense_train_flops"] / result["train_flops"] < 4.5


@pytest.mark.parametrize("flags, words", [
    (["--structure", "channel", "--engine", "ort-training"], "structure='channel' with engine='ort-training'"),
    (["--structure", "channel", "--dense"], "structure='channel' with sparsity=None"),
    (["--width", "8", "--model", "mlp"], "width=8 with model='mlp'"),
    (["--train-per-task", "0"], "train_per_task=0"),
])
def test_bad_structure_width_or_subset_flags_are_refused_before_any_work(tmp_path, flags, words):
    proc = subprocess.run(RUN + ["--out", str(tmp_path / "out")] + flags, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
