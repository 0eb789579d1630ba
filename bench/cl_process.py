"""`edgecl run`'s training process: a fresh interpreter that trains with the runtime only, never torch.

The host process (`edgecl.bench.cl_run.run_job`) loads the data, exports the model (torch) and
locks the checkpoint folder; `train_in_child` then starts this process, which opens the
artifacts, builds the learner and trains (`cl_run.train_job`, the code an in-process run runs
too), and writes its result as JSON into a file the host reads. The run's peak RSS, measured in
this process at the end of its run, is then what the training holds, as it would on a device,
without the host's torch.

- torch cannot be imported here: `block_torch` refuses it before anything of edgecl's loads
  (a finder on `sys.meta_path`, so `import torch` fails as if it were not installed);
- the digits come as an `.npz` the host writes (`save_npz`, as a board receives them):
  scikit-learn's loader imports scipy, which the training does not need; Fashion-MNIST's IDX
  files are read here by the runtime's own loader;
- the process adopts the host's lock on the checkpoint folder (an inherited descriptor) and
  writes the checkpoints; it exits at once when the host dies (its stdin, a pipe the host never
  writes, ends), so a killed `edgecl run` leaves no orphan holding the folder;
- its stdout and stderr (the progress bar) pass through the host, which keeps their tail for
  the message when the process fails.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# What the interpreter runs: no working folder first on sys.path (`python -c` puts it there), then
# the guard against torch, then this module.
_BOOT = ("import sys\n"
         "if sys.path and sys.path[0] == '':\n"
         "    del sys.path[0]\n"
         "from edgecl.bench.cl_process import child_main\n"
         "sys.exit(child_main(sys.argv[1]))\n")
EXIT_REFUSED = 2  # the training refused the job (its error is in the report); as `edgecl run` exits on bad input
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), as a shell reports it
EXIT_HOST_GONE = 3  # the host process died: nobody reads the result
STOP_S = 30.0  # after Ctrl-C: how long the training process gets to stop before it is killed
TAIL_CHARS = 8192  # of its output kept for an error message
TAIL_LINES = 6
# what the process reports as an error for the host to raise again, and `edgecl run` to print as one line
_REFUSALS = (ValueError, KeyError, FileNotFoundError, PermissionError)


class TrainingProcessError(RuntimeError):
    """The training process failed: killed by a signal, or ended with an error not of the job's making.

    Attributes:
        returncode: its exit code (negative: the signal that killed it). stderr_tail: its last lines.
    """

    def __init__(self, message: str, returncode: int, stderr_tail: str):
        super().__init__(message)
        self.returncode, self.stderr_tail = returncode, stderr_tail


class _RefuseTorch:
    """A `sys.meta_path` finder that refuses torch: `import torch` raises ModuleNotFoundError."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"no {name!r} in edgecl's runtime-only training process: it trains with numpy "
                                      "and ONNX Runtime only", name=name)
        return None


def block_torch() -> None:
    """Make torch unimportable in this process from now on (as if it were not installed).

    Raises:
        RuntimeError: torch is imported already.
    """
    if "torch" in sys.modules:
        raise RuntimeError("torch is imported already; accepted: block_torch() before anything imports it")
    if not any(isinstance(finder, _RefuseTorch) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RefuseTorch())


def train_in_child(job, artifacts, split_artifacts, writer, progress: bool, digits=None, python: str | None = None):
    """Train `job` on its export in a fresh runtime-only process; returns what that process reports.

    Args:
        job: the JobConfig (engine "portable" or "ort-training"). artifacts: the export's folder;
            split_artifacts: the latent-replay split export, or None.
        writer: the CheckpointWriter the host holds on the run's checkpoint folder (None: no
            checkpoints); the process adopts its lock and writes the checkpoints.
        progress: the progress bar and the memory plan's table (the process prints them).
        digits: the digits Dataset when `job.data` is "digits" (the host loads them: scikit-learn).
        python: the interpreter (default: this one); it needs numpy, onnxruntime and edgecl.
    Returns:
        (RunResult, the plan as a dict, the MemoryPlan or None, the process: {"training":
        "runtime-only", "pid", "torch_loaded"}).
    Raises:
        ValueError, KeyError, FileNotFoundError, PermissionError or an EdgeclError: what the
            training refused (a budget too small for the model...), raised again here, same message.
        TrainingProcessError: the process was killed or failed otherwise (exit code, stderr tail).
        KeyboardInterrupt: Ctrl-C; the process was stopped first (its checkpoints stay).
    """
    from edgecl.runtime.data import save_npz

    with tempfile.TemporaryDirectory(prefix="edgecl-run-") as tmp:
        tmp = Path(tmp)
        cfg = {"job": dataclasses.asdict(job), "artifacts": str(artifacts), "progress": bool(progress),
               "split_artifacts": None if split_artifacts is None else str(split_artifacts),
               "digits": None, "report": str(tmp / "report.json"),
               "checkpoint": None if writer is None else str(writer.root),
               "lock_fd": None if writer is None else writer.lock_fileno()}
        if digits is not None:
            save_npz(digits, tmp / "digits.npz")
            cfg["digits"] = str(tmp / "digits.npz")
        (tmp / "job.json").write_text(json.dumps(cfg))
        returncode, pid, tail = _run(python or sys.executable, tmp / "job.json", () if writer is None
                                     else (cfg["lock_fd"],))
        report = json.loads((tmp / "report.json").read_text()) if (tmp / "report.json").exists() else None
    if returncode == EXIT_REFUSED and report is not None and "error" in report:
        raise _error_from(report["error"])
    if returncode != 0 or report is None or "result" not in report:
        how = (f"was killed by {_signal_name(-returncode)} (exit code {returncode})" if returncode < 0
               else f"failed with exit code {returncode}")
        where = (f"; the checkpoints in {str(writer.root)!r} stay: the same command resumes from the last" if writer
                 else "; without a checkpoint folder it starts over")
        said = f"; the end of its stderr:\n{tail}" if tail else "; it wrote nothing on stderr"
        raise TrainingProcessError(f"the training process (pid {pid}) {how}{where}{said}", returncode, tail)
    return _result_from(report)


def _run(python: str, cfg_path: Path, pass_fds) -> tuple[int, int, str]:
    """Run the process to its end, its output passed through; returns (exit code, pid, stderr tail)."""
    env = dict(os.environ)
    if sys.stderr is not None and sys.stderr.isatty():  # the bar as wide as the terminal (tqdm cannot ask a pipe)
        env.setdefault("TQDM_NCOLS", str(shutil.get_terminal_size().columns - 1))
    proc = subprocess.Popen([python, "-c", _BOOT, str(cfg_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, pass_fds=pass_fds, env=env)
    tail = [""]
    pumps = [threading.Thread(target=_pass_through, args=(proc.stdout, lambda: sys.stdout), daemon=True),
             threading.Thread(target=_pass_through, args=(proc.stderr, lambda: sys.stderr, tail), daemon=True)]
    for pump in pumps:
        pump.start()
    try:
        returncode = proc.wait()
    except BaseException:  # Ctrl-C here: stop the training too (its checkpoints stay), then let it through
        _stop(proc)
        raise
    finally:
        for pump in pumps:
            pump.join(timeout=STOP_S)
        proc.stdin.close()  # after its end: an open pipe is what keeps the process alive
    return returncode, proc.pid, _last_lines(tail[0])


def _pass_through(pipe, out, tail: list | None = None) -> None:
    """Copy `pipe` to `out()` (this process's stream as it is then) as it comes; its last TAIL_CHARS
    characters into tail[0]."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    for chunk in iter(lambda: os.read(pipe.fileno(), 65536), b""):
        text = decoder.decode(chunk)
        if tail is not None:
            tail[0] = (tail[0] + text)[-TAIL_CHARS:]
        stream = out()
        try:
            if stream is not None:
                stream.write(text)
                stream.flush()
        except (OSError, ValueError):  # a closed or broken stream here: keep draining, or the process would block
            pass
    pipe.close()


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT (a Ctrl-C of its own, if the terminal did not send it one), then SIGKILL after STOP_S."""
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=STOP_S)
    except BaseException:  # it did not stop in time, or a second Ctrl-C
        proc.kill()
        proc.wait()


def _last_lines(text: str) -> str:
    """The last TAIL_LINES non-empty lines, each as a terminal shows it (what its last \\r leaves)."""
    lines = [next((part.rstrip() for part in reversed(line.split("\r")) if part.strip()), "")
             for line in text.split("\n")]
    return "\n".join([line for line in lines if line][-TAIL_LINES:])


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _error_record(e: BaseException) -> dict:
    """What the host needs to raise `e` again: its class (one the host can name) and its arguments."""
    from edgecl.runtime import errors

    kind = next(c for c in type(e).__mro__ if c in _REFUSALS or vars(errors).get(c.__name__) is c)
    message = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
    return {"type": kind.__name__, "message": message, "differences": getattr(e, "differences", None)}


def _error_from(record: dict) -> Exception:
    from edgecl.runtime import errors

    kind = next((c for c in _REFUSALS if c.__name__ == record["type"]), None) or getattr(errors, record["type"])
    if kind is errors.ConfigMismatchError:
        return kind(record["message"], record["differences"])
    return kind(record["message"])


def _result_from(report: dict):
    from edgecl.runtime.budget import MemoryPlan
    from edgecl.runtime.loop import RunResult

    plan = None if report["memory_plan"] is None else MemoryPlan(**report["memory_plan"])
    process = {"training": "runtime-only", "pid": report["pid"], "torch_loaded": report["torch_loaded"]}
    return RunResult(**report["result"]), report["budget_plan"], plan, process


def _exit_with_host(exchange: Path) -> None:
    """Exit at once when the host process ends (its end closes the pipe on our stdin), removing
    `exchange`, the folder of the job and the report, which the host would have removed."""

    def watch():
        while os.read(0, 4096):
            pass
        shutil.rmtree(exchange, ignore_errors=True)
        os._exit(EXIT_HOST_GONE)  # like a SIGKILL: the checkpoints are written to survive one

    threading.Thread(target=watch, daemon=True, name="host-watch").start()


def _interrupt_once(signum, frame):
    # Ctrl-C reaches this process from the terminal and again from the host passing it on: one
    # KeyboardInterrupt, so that the second cannot break the first one's unwinding
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def child_main(cfg_path: str) -> int:
    """The training process: train the job `cfg_path` describes and write the report; returns the exit code.

    Exit codes: 0 (the report holds the result), EXIT_REFUSED (the report holds the error),
    EXIT_INTERRUPTED (Ctrl-C); an unexpected error prints its traceback and exits 1.
    """
    block_torch()
    _exit_with_host(Path(cfg_path).parent)
    signal.signal(signal.SIGINT, _interrupt_once)
    cfg = json.loads(Path(cfg_path).read_text())
    from edgecl.bench.cl_run import JobConfig, job_scenario, train_job
    from edgecl.runtime import errors, open_engine
    from edgecl.runtime.checkpoint import CheckpointWriter
    from edgecl.runtime.data import load_npz
    from edgecl.runtime.files import write_atomic

    writer = None
    try:
        job = JobConfig(**cfg["job"])
        scenario = job_scenario(job, None if cfg["digits"] is None else load_npz(cfg["digits"]))
        engine = open_engine(cfg["artifacts"], job.optimizer(), threads=job.threads)
        if cfg["checkpoint"] is not None:
            writer = CheckpointWriter(cfg["checkpoint"], lock_fd=cfg["lock_fd"])
        result, plan_dict, plan = train_job(job, scenario, engine, cfg["split_artifacts"], writer, cfg["progress"])
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (*_REFUSALS, errors.EdgeclError) as e:
        write_atomic(cfg["report"], json.dumps({"error": _error_record(e)}))
        return EXIT_REFUSED
    finally:
        if writer is not None:
            writer.close()  # closes this process's descriptor only: the host's still holds the lock
    write_atomic(cfg["report"], json.dumps({
        "result": result.to_dict(), "budget_plan": plan_dict,
        "memory_plan": None if plan is None else dataclasses.asdict(plan),
        "pid": os.getpid(), "torch_loaded": "torch" in sys.modules}))
    return 0
