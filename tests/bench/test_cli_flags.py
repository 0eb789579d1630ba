"""Bad flags of `edgecl run|train|device` and `bench ...` are refused up front: exit code 2, a message
naming the flag and the value (and what is accepted), no traceback, nothing written.

Each command runs in this process (`main([...])`) inside an empty working folder; an input that got
past the checks would export and train, so every case here must be refused in well under a second.
"""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecl.bench import bench_cli, edgecl_cli

MAINS = {"edgecl": edgecl_cli.main, "bench": bench_cli.main}


def refused(program: str, argv: list[str], folder: Path) -> str:
    """Run `program argv` in `folder`; assert exit code 2, no exception and nothing written; return stderr."""
    before = sorted(folder.rglob("*"))
    err = io.StringIO()
    with contextlib.chdir(folder), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = MAINS[program](argv)
        except SystemExit as e:  # argparse: a value its type cannot parse
            code = e.code
    assert code == 2, (argv, err.getvalue())
    assert "Traceback" not in err.getvalue()
    assert sorted(folder.rglob("*")) == before, f"{argv} wrote {sorted(set(folder.rglob('*')) - set(before))}"
    return err.getvalue()


def names(message: str, flag: str, value: str) -> bool:
    """Whether the message names the flag and shows the value (as typed, or as Python prints the number)."""
    forms = {value}
    for kind in (int, float):
        try:
            forms.add(repr(kind(value)))
        except ValueError:
            pass
    return flag in message and any(form in message for form in forms)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    return tmp_path


# --- the cases of issue 11, item 9 and 10 ------------------------------------------------------------

@pytest.mark.parametrize("program, argv, flag, value, accepted", [
    ("edgecl", ["run", "--budget", "10 TiB"], "--budget", "10 TiB", r"accepted: budget <= [\d,]+ B"),
    ("edgecl", ["run", "--buffer", "1000000000000"], "--buffer", "1000000000000", r"accepted: buffer <= [\d,]+ examples"),
    ("edgecl", ["run", "--batch", "0"], "--batch", "0", "accepted: an integer >= 2"),
    ("edgecl", ["run", "--seed", "18446744073709551616"], "--seed", "18446744073709551616",
     r"accepted: an integer >= 0 and <= 2\*\*64 - 1"),
    ("edgecl", ["run", "--lr", "1e30"], "--lr", "1e30", "accepted: > 0 and <= 100"),
    ("edgecl", ["run", "--dense", "--sparsity", "0.9"], "--sparsity", "0.9", "with --dense"),
    ("edgecl", ["run", "--method", "finetune", "--dense", "--budget", "2MiB", "--buffer", "10"], "--buffer", "10",
     "with --method finetune: finetune replays nothing"),
    ("edgecl", ["run", "--dense", "--no-ddr"], "--no-ddr", "--dense", "parts of SparCL"),
    ("edgecl", ["run", "--method", "joint", "--sparsity", "0.9"], "--sparsity", "0.9", "with --method joint: SparCL"),
    ("bench", ["devices", "--cache", "a-folder"], "--cache", "a-folder", "is a folder; accepted: a file path"),
    ("bench", ["devices", "--probe", "--cache", "a-file/host.toml"], "--cache", "a-file/host.toml",
     "cannot create its folder"),
    ("bench", ["devices", "--no-host", "--cache", "a-file"], "--cache", "--no-host", "accepted: one or the other"),
    ("bench", ["report", "--out", "a-file", "--latency", "a-file"], "--out", "a-file", "is a file; accepted: a folder"),
    ("bench", ["latency", "--cache", "a-file"], "--cache", "a-file", "is a file; accepted: a folder"),
    ("bench", ["memory", "--cache", "a-file"], "--cache", "a-file", "is a file; accepted: a folder"),
    ("bench", ["drift", "--seeds", "x"], "--seeds", "x", "accepted: integers separated by commas"),
    ("bench", ["drift", "--dense", "--sparsity", "0.9"], "--sparsity", "0.9", "with --dense"),
    ("bench", ["drift", "--out", "a-file"], "--out", "a-file", "is a file"),
    ("bench", ["run", "--seeds", "x"], "--seeds", "x", "accepted: integers separated by commas"),
    ("bench", ["run", "--seeds", "0,-1", "--out", "m"], "--seeds", "-1", "accepted: an integer >= 0"),
    ("bench", ["run", "--epochs", "0", "--out", "m"], "--epochs", "0", "accepted: an integer >= 1"),
    ("bench", ["run", "--out", "a-file"], "--out", "a-file", "is a file"),
    ("bench", ["flops", "--profile", "a-file"], "--profile", "a-file", "without --device"),
    ("bench", ["flops", "--artifacts", "a-folder", "--model", "mlp"], "--model", "--artifacts", "accepted: "),
    ("bench", ["step", "--input-shape", "axb"], "--input-shape", "axb", "accepted: positive integers joined by 'x'"),
    ("bench", ["latency", "--seed", "-1"], "--seed", "-1", "accepted: an integer >= 0"),
    ("bench", ["devices", "--threads", "0"], "--threads", "0", "accepted: an integer >= 1"),
    ("bench", ["stream", "--seeds", "0,18446744073709551616"], "--seeds", "18446744073709551616",
     r"accepted: one or more distinct integers in \[0, 2\*\*64 - 1\]"),
    ("bench", ["stream", "--group", "0-8"], "--group", "(0, 8)", r"accepted: \(lo, hi\) integers"),
    ("bench", ["stream", "--methods", "er,joint"], "--methods", "joint", "accepted: distinct names among"),
    ("bench", ["stream", "--buffer-bytes", "8 parsecs"], "--buffer-bytes", "8 parsecs", "accepted: a number"),
    ("bench", ["stream", "--json", "a-folder"], "--json", "a-folder", "is a folder"),
    ("bench", ["online", "--methods", "joint"], "--methods", "joint", "accepted: distinct names among"),
    ("bench", ["online", "--input-shape", "1x2x2"], "--input-shape", "(1, 2, 2)", "accepted: \\(C, H, W\\)"),
    ("bench", ["online", "--learn-sizes", "0"], "--learn-sizes", "[0]", "accepted: distinct integers >= 1"),
    ("bench", ["latency", "--runtime-python", "a-file"], "--runtime-python", "a-file", "accepted: the path of a"),
    ("edgecl", ["train", "a-folder", "--seed", "-1"], "--seed", "-1", "accepted: an integer >= 0"),
    ("edgecl", ["train", "a-folder", "--data", "a-folder"], "data file", "a-folder", "is a folder; accepted: a file"),
    ("edgecl", ["device", "train", "--port", "/nonexistent", "--batch", "0"], "--batch", "0", "accepted: an integer"),
    ("edgecl", ["device", "train", "--port", "/nonexistent", "--dense", "--sparsity", "0.5"], "--sparsity", "0.5",
     "with --dense"),
    ("edgecl", ["device", "eval", "--port", "/nonexistent", "--tasks", "0"], "--tasks", "0", "accepted: an integer"),
])
def test_a_bad_flag_is_refused_up_front_naming_it(folder, program, argv, flag, value, accepted):
    import re

    message = refused(program, argv, folder)
    assert names(message, flag, value) and re.search(accepted, message), message


def test_bench_run_passes_no_buffer_to_strategies_without_one(tmp_path):
    from edgecl.bench.matrix import Cell, _cell_arguments

    assert "--buffer" not in _cell_arguments(Cell("finetune", 0), tmp_path, "digits", "cnn", 1, 200)
    er = _cell_arguments(Cell("er", 0), tmp_path, "digits", "cnn", 1, 200)
    assert er[er.index("--buffer") + 1] == "200"


# --- property: any bad value of a numeric flag ----------------------------------------------------------

BAD_NUMBERS = st.one_of(st.sampled_from(["x", "", "nan", "inf", "-inf", "1e999", "0x10", "1,5", "--"]),
                        st.integers(max_value=-1).map(str), st.integers(min_value=2**64, max_value=2**70).map(str))
# (program, subcommand and any arguments it needs, flag, the lowest value the flag accepts, whether it is an int)
NUMERIC_FLAGS = [
    ("edgecl", ["run"], "--epochs", 1, int), ("edgecl", ["run"], "--batch", 2, int),
    ("edgecl", ["run"], "--lr", 0, float), ("edgecl", ["run"], "--seed", 0, int),
    ("edgecl", ["run"], "--threads", 1, int), ("edgecl", ["run"], "--buffer", 1, int),
    ("edgecl", ["run"], "--checkpoint-every", 0, int), ("edgecl", ["run"], "--sparsity", 0, float),
    ("edgecl", ["train", "."], "--steps", 1, int), ("edgecl", ["train", "."], "--batch", 1, int),
    ("edgecl", ["train", "."], "--lr", 0, float), ("edgecl", ["train", "."], "--seed", 0, int),
    ("edgecl", ["device", "train", "--port", "/nonexistent"], "--epochs", 1, int),
    ("edgecl", ["device", "train", "--port", "/nonexistent"], "--lr", 0, float),
    ("edgecl", ["device", "train", "--port", "/nonexistent"], "--tasks", 1, int),
    ("bench", ["flops"], "--batch", 1, int), ("bench", ["flops"], "--examples", 1, int),
    ("bench", ["flops"], "--epochs", 1, int), ("bench", ["flops"], "--sparsity", 0, float),
    ("bench", ["flops"], "--grad-density", 0, float), ("bench", ["flops"], "--momentum", 0, float),
    ("bench", ["latency"], "--batch", 1, int), ("bench", ["latency"], "--repeats", 1, int),
    ("bench", ["latency"], "--warmup", 0, int), ("bench", ["latency"], "--seed", 0, int),
    ("bench", ["memory"], "--steps", 1, int), ("bench", ["memory"], "--threads", 1, int),
    ("bench", ["drift"], "--epochs", 1, int), ("bench", ["drift"], "--buffer", 1, int),
    ("bench", ["run"], "--epochs", 1, int), ("bench", ["run"], "--buffer", 1, int), ("bench", ["run"], "--workers", 1, int),
    ("bench", ["devices"], "--threads", 1, int),
    ("bench", ["stream"], "--lr", 0, float), ("bench", ["stream"], "--threads", 1, int),
    ("bench", ["stream"], "--batch", 1, int), ("bench", ["stream"], "--replay-batch", 1, int),
    ("bench", ["stream"], "--replay-steps", 0, int), ("bench", ["stream"], "--tdm-every", 1, int),
    ("bench", ["stream"], "--train-per-class", 1, int), ("bench", ["stream"], "--sparsity", 0, float),
    ("bench", ["online"], "--repeats", 3, int), ("bench", ["online"], "--warmup", 0, int),
    ("bench", ["online"], "--seed", 0, int), ("bench", ["online"], "--threads", 1, int),
    ("bench", ["online"], "--replay-batch", 1, int), ("bench", ["online"], "--lr", 0, float),
]


def _accepted(text: str, flag: str, low, kind) -> bool:
    """Whether `text` is a value the flag takes (those are not what this test draws: a huge count of
    epochs or steps is a long run, not a bad value; a seed of 2**64 or an lr of 1e30 is)."""
    try:
        value = kind(text)
    except ValueError:
        return False
    if not math.isfinite(value) or value < low:
        return False
    return value <= 100 if kind is float else (flag not in ("--seed", "--seeds") or value < 2**64)


@pytest.mark.parametrize("program, command, flag, low, kind", NUMERIC_FLAGS,
                         ids=[f"{p} {c[0]} {f}" for p, c, f, _, _ in NUMERIC_FLAGS])
@settings(max_examples=12, deadline=None)
@given(text=BAD_NUMBERS)
def test_any_bad_value_of_a_numeric_flag_is_refused_naming_flag_and_value(program, command, flag, low, kind, text):
    if _accepted(text, flag, low, kind):
        return
    with tempfile.TemporaryDirectory() as tmp:
        message = refused(program, [*command, f"{flag}={text}"], Path(tmp))
    assert names(message, flag, text), message


@pytest.mark.parametrize("method", ["finetune", "joint"])
def test_the_dense_bounds_need_no_dense_flag(method):
    """`--method finetune` is the lower bound, dense: no SparCL default (0.75) the user never typed."""
    args = edgecl_cli.build_parser().parse_args(["run", "--method", method])
    job = edgecl_cli.run_job_config(args)
    assert job.sparsity is None and job.method == method
