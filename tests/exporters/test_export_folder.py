"""Where an export writes: never over what it did not write, whole or not at all, one export at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from edgecl.bench import edgecl_cli
from edgecl.exporters import build_model, export
from edgecl.runtime import UnsupportedModelError, load_manifest

X = torch.zeros(2, 1, 8, 8)


@pytest.fixture(scope="module")
def mlp():
    return build_model("mlp")


def test_a_folder_holding_a_users_file_is_refused_and_kept(tmp_path, mlp):
    out = tmp_path / "p"
    out.mkdir()
    (out / "thesis.txt").write_text("x")
    with pytest.raises(ValueError, match=r"output folder '.*/p' holds 'thesis\.txt', which no export wrote"):
        export(mlp, X, out)
    assert [e.name for e in out.iterdir()] == ["thesis.txt"] and (out / "thesis.txt").read_text() == "x"
    assert list(tmp_path.iterdir()) == [out]  # no temporary folder, no lock file: refused before any work


def test_a_users_file_next_to_an_earlier_export_is_kept(tmp_path, mlp):
    export(mlp, X, tmp_path / "a")
    (tmp_path / "a" / "notes.md").write_text("mine")
    with pytest.raises(ValueError, match=r"holds 'notes\.md'"):
        export(mlp, X, tmp_path / "a")
    assert (tmp_path / "a" / "notes.md").read_text() == "mine"
    load_manifest(tmp_path / "a")  # the earlier export is untouched


def test_an_earlier_export_is_replaced_whole(tmp_path, mlp):
    out = tmp_path / "a"
    export(mlp, X, out, engine="portable")
    first = load_manifest(out)
    export(build_model("cnn"), X, out, engine="portable")
    assert load_manifest(out).parameters != first.parameters
    names = {e.name for e in out.iterdir()}
    assert names == set(load_manifest(out).files) | {"manifest.json", "manifest.sha256"}
    assert {e.name for e in tmp_path.iterdir()} == {"a", ".a.lock"}  # nothing left beside it but the lock file


@pytest.mark.ort_training
def test_an_export_of_the_other_engine_leaves_no_file_of_the_first(tmp_path, mlp):
    out = tmp_path / "a"
    export(mlp, X, out, engine="portable")
    export(mlp, X, out, engine="ort-training")
    assert not (out / "step.onnx").exists()
    assert {e.name for e in out.iterdir()} == set(load_manifest(out).files) | {"manifest.json", "manifest.sha256"}


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_the_folder_and_files_get_the_mode_a_plain_mkdir_and_write_give(tmp_path, mlp):
    plain_dir, plain_file = tmp_path / "plain", tmp_path / "plain.txt"
    plain_dir.mkdir()
    plain_file.write_text("")
    export(mlp, X, tmp_path / "new")
    assert (tmp_path / "new").stat().st_mode & 0o777 == plain_dir.stat().st_mode & 0o777  # not mkdtemp's 0700
    for f in (tmp_path / "new").iterdir():
        assert f.stat().st_mode & 0o777 == plain_file.stat().st_mode & 0o777, f.name
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o750)
    os.chmod(empty, 0o750)
    export(mlp, X, empty)
    assert empty.stat().st_mode & 0o777 == 0o750  # a folder that existed keeps its mode


def test_the_working_folder_is_refused_and_kept(tmp_path, mlp, monkeypatch):
    (tmp_path / "data.csv").write_text("1,2")
    monkeypatch.chdir(tmp_path)
    for out in (".", str(tmp_path), str(tmp_path.parent)):
        with pytest.raises(ValueError, match=r"is the working folder or holds it"):
            export(mlp, X, out)
    assert [e.name for e in tmp_path.iterdir()] == ["data.csv"]


def test_a_file_as_output_folder_and_overwrite_false_are_refused(tmp_path, mlp):
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match=r"output folder '.*/f' is a file"):
        export(mlp, X, tmp_path / "f")
    export(mlp, X, tmp_path / "a")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export(mlp, X, tmp_path / "a", overwrite=False)


def test_a_failed_export_keeps_the_earlier_one_and_leaves_nothing_behind(tmp_path, mlp, monkeypatch):
    import importlib

    export_module = importlib.import_module("edgecl.exporters.export")  # the module, not the function

    export(mlp, X, tmp_path / "a")
    before = {e.name: e.read_bytes() for e in (tmp_path / "a").iterdir()}

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_module, "export_inference", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export(build_model("cnn"), X, tmp_path / "a")
    assert {e.name: e.read_bytes() for e in (tmp_path / "a").iterdir()} == before
    assert {e.name for e in tmp_path.iterdir()} == {"a", ".a.lock"}


HOLD_LOCK = """
import sys
from edgecl.runtime.locks import folder_lock
with folder_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_a_second_export_into_a_folder_being_written_is_refused(tmp_path, mlp, capsys):
    out = tmp_path / "a"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(Exception, match=r"output folder '.*/a' is being written by another process") as e:
            export(mlp, X, out)
        assert type(e.value).__name__ == "FolderBusyError"
        assert edgecl_cli.main(["export", "--model", "mlp", "--out", str(out)]) == 2
        assert "is being written by another process" in capsys.readouterr().err
        assert not out.exists()
    finally:
        holder.communicate("\n", timeout=30)
    export(mlp, X, out)  # free again once the other writer is done
    load_manifest(out)


def test_the_lock_refuses_another_thread_and_re_enters_in_its_own():
    from edgecl.runtime.errors import FolderBusyError
    from edgecl.runtime.locks import folder_lock

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "f")
        held, release, seen = threading.Event(), threading.Event(), []

        def holder():
            with folder_lock(folder):
                with folder_lock(folder):  # the same thread takes it again (export inside the bench cache)
                    held.set()
                    release.wait(30)

        def other():
            try:
                with folder_lock(folder):
                    seen.append("acquired")
            except FolderBusyError as e:
                seen.append(str(e))

        t = threading.Thread(target=holder)
        t.start()
        assert held.wait(30)
        other_thread = threading.Thread(target=other)
        other_thread.start()
        other_thread.join(30)
        release.set()
        t.join(30)
        assert len(seen) == 1 and "being written by another process or thread" in seen[0]
        waited = []
        with folder_lock(folder, wait=True):
            waited.append(True)
        assert waited == [True]


def test_cli_export_refuses_a_users_folder_with_rc_2(tmp_path, capsys):
    out = tmp_path / "p"
    out.mkdir()
    (out / "thesis.txt").write_text("x")
    assert edgecl_cli.main(["export", "--model", "mlp", "--out", str(out)]) == 2
    assert "holds 'thesis.txt'" in capsys.readouterr().err
    assert [e.name for e in out.iterdir()] == ["thesis.txt"]


def test_cli_export_into_the_working_folder_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "keep.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    assert edgecl_cli.main(["export", "--model", "mlp", "--out", "."]) == 2
    assert "'.' is the working folder" in capsys.readouterr().err
    assert [e.name for e in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("argv, message", [
    (["--classes", "0"], r"--classes 0; accepted: an integer >= 2"),
    (["--classes", "1"], r"--classes 1; accepted: an integer >= 2"),
    (["--input-shape", "0x8x8"], r"--input-shape '0x8x8'.*accepted: positive integers"),
    (["--input-shape", "8x8", "--model", "cnn"], r"--input-shape '8x8'.*accepted: \(C, H, W\)"),
    (["--input-shape", "1x8xa"], r"--input-shape '1x8xa'"),
    (["--input-shape", "1x2x2", "--model", "cnn"], r"--input-shape '1x2x2'.*H, W >= 4"),
    (["--seed", str(2**64)], r"--seed 18446744073709551616; accepted"),
])
def test_cli_export_refuses_bad_flags_before_writing(tmp_path, capsys, argv, message):
    out = tmp_path / "a"
    assert edgecl_cli.main(["export", "--model", "mlp", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    import re

    assert re.search(message, err), err
    assert not out.exists()


class _FeatureMap(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)

    def forward(self, x):
        return self.conv(x)


class _OneColumn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 1)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("engine", ["portable", pytest.param("ort-training", marks=pytest.mark.ort_training)])
@pytest.mark.parametrize("model, shape", [(_FeatureMap, r"\(2, 2, 6, 6\)"), (_OneColumn, r"\(2, 1\)")])
def test_a_model_whose_output_is_not_n_by_classes_is_refused_before_writing(tmp_path, capfd, engine, model, shape):
    with pytest.raises(UnsupportedModelError, match=rf"model output is {shape}.*accepted: float32 logits of shape "
                                                    r"\(2, classes\) with classes >= 2"):
        export(model(), X, tmp_path / "a", engine=engine)
    assert not any(tmp_path.iterdir())
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # no torch log lines either


def test_an_empty_example_input_is_refused(tmp_path, mlp):
    with pytest.raises(ValueError, match=r"example_input has shape \(2, 0, 8, 8\)"):
        export(mlp, torch.zeros(2, 0, 8, 8), tmp_path / "a")
    assert not any(tmp_path.iterdir())


def test_cli_export_writes_json_manifest(tmp_path, capsys):
    assert edgecl_cli.main(["export", "--model", "mlp", "--out", str(tmp_path / "a"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["engine"] == "portable"
