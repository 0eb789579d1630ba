"""`edgecl run` end to end: results table, JSON, plot, budget refusal, resume after SIGKILL, and the training
in a runtime-only process of its own."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def live_children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, zombies left out (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if int(ppid) == pid and state != "Z":
            found.append(int(stat.parent.name))
    return found


def is_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(condition, what: str, proc=None, timeout_s: float = 300.0) -> bool:
    """Poll until `condition()` holds; False if `proc` ended first (the run was too short to catch)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc is not None and proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:g} s"
        time.sleep(0.02)
    return True


def test_resume_after_sigkill_gives_exactly_the_uninterrupted_metrics(uninterrupted, out_dir, tmp_path):
    _, plain = uninterrupted
    ckpt = tmp_path / "ckpt"
    args = RUN + ["--out", str(out_dir), "--checkpoint", str(ckpt), "--checkpoint-every", "5",
                  "--json", str(tmp_path / "resumed.json")]
    rng = np.random.default_rng(0)
    kills = orphans = 0
    for _ in range(3):  # kill it at a random moment once it has checkpointed, three times
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: (ckpt / "LATEST").exists(), "checkpoint", proc)
        time.sleep(float(rng.uniform(0.0, 0.6)))
        training = live_children(proc.pid)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
            orphans += bool(training)
        proc.wait()
        at_kill = (ckpt / "LATEST").read_text()
        # its training process ends with it, finishing at most the save under way: it would hold the folder and
        # write on into it (to the run's end), with the next run's training beside it
        wait_for(lambda: not any(map(is_running, training)), "end of the orphaned training process", timeout_s=60)
        assert int((ckpt / "LATEST").read_text()[5:]) - int(at_kill[5:]) <= 1
    assert kills >= 1 and orphans >= 1, "the run finished before it could be killed; make it longer"
    final = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["resumed"] is True
    for key in EXACT_KEYS:
        assert resumed[key] == plain[key], key


def test_killing_the_training_process_or_ctrl_c_is_reported_and_the_checkpoint_resumes(uninterrupted, out_dir,
                                                                                         tmp_path):
    _, plain = uninterrupted
    ckpt = tmp_path / "ckpt"
    # a checkpoint every step: the same metrics (the cadence is no setting), a run long enough to catch
    args = RUN + ["--out", str(out_dir), "--checkpoint", str(ckpt), "--checkpoint-every", "1",
                  "--json", str(tmp_path / "resumed.json")]

    def start_and_catch_training(attempts=3):
        for _ in range(attempts):  # until a run is caught training after a checkpoint of its own
            before = (ckpt / "LATEST").read_text() if (ckpt / "LATEST").exists() else None
            # a session of its own: a Ctrl-C at a terminal goes to its whole process group
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
            if wait_for(lambda: (ckpt / "LATEST").exists() and (ckpt / "LATEST").read_text() != before,
                        "new checkpoint", proc):
                training = live_children(proc.pid)
                if len(training) == 1 and proc.poll() is None:
                    return proc, training[0]
            proc.communicate(timeout=300)
            shutil.rmtree(ckpt)  # it ran to the end: start over
        pytest.fail("every run finished before it could be caught; make it longer")

    proc, child = start_and_catch_training()
    os.kill(child, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    assert (f"edgecl run: error: the training process (pid {child}) was killed by SIGKILL (exit code -9); the "
            f"checkpoints in '{ckpt}' stay: the same command resumes from the last") in err
    assert "Traceback" not in err

    proc, child = start_and_catch_training()
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: host and training process both get it
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"edgecl run: interrupted; the checkpoints in '{ckpt}' stay: the same "
                                            "command resumes from the last")
    assert "Traceback" not in err and not is_running(child)

    final = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["resumed"] is True
    for key in EXACT_KEYS:
        assert resumed[key] == plain[key], key


# --- where the training runs ---------------------------------------------------------------------


def test_the_training_runs_in_a_runtime_only_process_whose_own_peak_rss_is_reported(uninterrupted):
    stdout, result = uninterrupted
    process = result["config"]["process"]
    assert process["training"] == "runtime-only" and process["torch_loaded"] is False
    assert process["pid"] != process["host_pid"]
    # two peaks of one run: the host imported torch to export, the training process never did
    assert 0 < result["peak_rss_bytes"] < process["host_peak_rss_bytes"]
    assert (f"peak RSS           {result['peak_rss_bytes'] / 2**20:.1f} MiB (the training process: runtime-only, no "
            f"torch; the export ran in the host process, peak {process['host_peak_rss_bytes'] / 2**20:.1f} MiB)"
            in stdout.splitlines())


@pytest.mark.torch
def test_the_training_process_gives_exactly_the_metrics_of_training_in_the_host(uninterrupted, out_dir):
    from edgecl.bench.cl_run import run_job
    from edgecl.bench.edgecl_cli import build_parser, run_job_config

    _, child = uninterrupted
    job = run_job_config(build_parser().parse_args(RUN[3:] + ["--out", str(out_dir)]))
    here, _, _ = run_job(job, out_dir, progress=False, isolate=False)
    assert here.config["process"]["training"] == "host" and here.config["process"]["pid"] == os.getpid()
    for key in EXACT_KEYS:
        assert getattr(here, key) == child[key], key
    config = json.loads(json.dumps(here.config))
    assert {k: v for k, v in config.items() if k != "process"} == {
        k: v for k, v in child["config"].items() if k != "process"}


def test_the_torch_engine_trains_in_the_host_process_and_says_so(tmp_path):
    path = tmp_path / "torch.json"
    proc = subprocess.run(RUN[:4] + ["--epochs", "1", "--threads", "1", "--quiet", "--engine", "torch", "--budget",
                                      "2MiB", "--out", str(tmp_path / "out"), "--json", str(path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(path.read_text())
    process = result["config"]["process"]
    assert process["training"] == "host" and process["torch_loaded"] is True and process["pid"] == process["host_pid"]
    assert "MiB (the host process: export and training, torch included; the torch engine trains there)" in proc.stdout
    assert (f"measured peak RSS of the whole process {result['peak_rss_bytes']:,} B (Python, numpy, ONNX Runtime and "
            "torch included: training ran in the host process, where the export did)") in proc.stdout


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
                                      "--structure", "channel", "--sparsity", "0.5", "--budget", "4MiB",
                                      "--out", str(tmp_path / "out"), "--json", str(path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(path.read_text())
    host = result["config"]["process"]["host_peak_rss_bytes"]
    assert (f"measured peak RSS of the training process {result['peak_rss_bytes']:,} B (runtime-only: Python, numpy "
            f"and ONNX Runtime included, no torch; the export ran in the host process, peak {host:,} B)") in proc.stdout
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
