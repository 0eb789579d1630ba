"""`edgecl run`'s training process (bench/cl_process.py): no torch there, failures and refusals reported back."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgecl.bench.cl_process import TrainingProcessError, _error_from, _error_record, train_in_child
from edgecl.bench.cl_run import JobConfig
from edgecl.runtime.dataset import DataError
from edgecl.runtime.errors import ConfigMismatchError, EdgeclError

STOCK_PYTHON = Path(__file__).resolve().parents[2] / ".venv-stock-ort" / "bin" / "python"

GUARDED = textwrap.dedent("""
    import sys
    from edgecl.bench.cl_process import block_torch
    block_torch()
    import numpy, onnxruntime, edgecl.runtime, edgecl.bench.cl_run  # what the training process imports
    for name in ("torch", "torch.nn"):
        try:
            __import__(name)
        except ModuleNotFoundError as e:
            print(name, "refused:", e)
    print("torch loaded:", "torch" in sys.modules)
""")


def test_torch_cannot_be_imported_in_the_training_process_but_the_runtime_can():
    proc = subprocess.run([sys.executable, "-c", GUARDED], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [
        "torch refused: no 'torch' in edgecl's runtime-only training process: it trains with numpy and ONNX Runtime "
        "only",
        "torch.nn refused: no 'torch' in edgecl's runtime-only training process: it trains with numpy and ONNX "
        "Runtime only",
        "torch loaded: False"]


def test_a_failed_training_process_is_reported_with_its_exit_code_and_last_lines(tmp_path):
    fake = tmp_path / "python"  # an "interpreter" that prints a progress bar and an error, then fails
    fake.write_text("#!/bin/sh\necho 'loading' >&2\nprintf 'bar 1\\rbar 2\\r\\n' >&2\necho 'MemoryError: boom' >&2\n"
                    "exit 7\n")
    fake.chmod(0o755)
    with pytest.raises(TrainingProcessError) as caught:
        train_in_child(JobConfig(), tmp_path, None, None, False, python=str(fake))
    e = caught.value
    assert e.returncode == 7 and e.stderr_tail == "loading\nbar 2\nMemoryError: boom"  # each line as a terminal shows it
    assert str(e).startswith("the training process (pid ")
    assert str(e).endswith(") failed with exit code 7; without a checkpoint folder it starts over; the end of its "
                           "stderr:\nloading\nbar 2\nMemoryError: boom")
    assert not isinstance(e, (ValueError, EdgeclError))  # not bad input: `edgecl run` exits 1, not 2


@pytest.mark.parametrize("error, kind", [
    (ValueError("budget='64KiB' is too small"), ValueError),
    (FileNotFoundError("no file 'x'"), FileNotFoundError),
    (KeyError("a key"), KeyError),
    (ConfigMismatchError("other settings: epochs: 3 in the checkpoint, 4 now", ["epochs: 3 in the checkpoint, 4 now"]),
     ConfigMismatchError),
    (DataError("data file 'x' is bad"), EdgeclError),  # its nearest class the host can name
])
def test_a_refusal_in_the_training_process_is_raised_again_in_the_host_with_its_message(error, kind):
    again = _error_from(json.loads(json.dumps(_error_record(error))))
    assert type(again) is kind and again.args == error.args
    assert getattr(again, "differences", None) == getattr(error, "differences", None)


@pytest.mark.skipif(not STOCK_PYTHON.exists(), reason="no .venv-stock-ort: ./bootstrap.sh test creates it")
def test_the_training_process_runs_where_torch_is_not_installed(exported):
    """The venv of a board (numpy, stock onnxruntime, edgecl; no torch, no scikit-learn) trains the job."""
    from edgecl.runtime.data import load_digits

    _, folder = exported("cnn")
    job = JobConfig(epochs=1, threads=1, buffer=50)
    result, plan_dict, plan, process = train_in_child(job, folder, None, None, False, load_digits(),
                                                      python=str(STOCK_PYTHON))
    assert process["training"] == "runtime-only" and process["torch_loaded"] is False
    assert len(result.acc_matrix) == 5 and result.steps > 0 and result.peak_rss_bytes > 0
    assert plan is None and plan_dict["buffer_examples"] == 50
