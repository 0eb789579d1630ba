"""write_atomic (whole file or nothing, the mode a plain write gives) and prepare_output."""

from __future__ import annotations

import os

import pytest

from edgecl.runtime import files
from edgecl.runtime.files import prepare_output, write_atomic


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    write_atomic(path, '{"acc": 1}')
    write_atomic(path, b'{"acc": 2}')
    assert path.read_text() == '{"acc": 2}'

    def crash(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, '{"acc": 3}')
    assert path.read_text() == '{"acc": 2}'
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left behind


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_write_atomic_gives_the_mode_a_plain_write_would(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    fresh = write_atomic(tmp_path / "fresh.json", "{}")
    assert fresh.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not mkstemp's 0600
    fresh.chmod(0o640)
    write_atomic(fresh, "{}")
    assert fresh.stat().st_mode & 0o777 == 0o640  # a replaced file keeps its mode


def test_write_atomic_writes_through_a_symlink_and_names_a_missing_folder(tmp_path):
    target = tmp_path / "target.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_atomic(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    with pytest.raises(FileNotFoundError, match="nowhere/x.json'.*folder .*nowhere' does not exist"):
        write_atomic(tmp_path / "nowhere" / "x.json", "{}")


def test_fsync_dir_tolerates_a_file_system_that_cannot(tmp_path, monkeypatch):
    import errno

    def refuse(_fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", refuse)
    files.fsync_dir(tmp_path)  # no error: the entry is there, the mount cannot promise more
    monkeypatch.setattr(os, "fsync", lambda _fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        files.fsync_dir(tmp_path)


def test_prepare_output_creates_the_folder_and_refuses_what_cannot_be_written(tmp_path, monkeypatch):
    path = prepare_output(tmp_path / "a" / "b" / "run.json")
    assert path.parent.is_dir()
    with pytest.raises(ValueError, match="suffix '.txt'; accepted: .png, .pdf"):
        prepare_output(tmp_path / "plot.txt", (".png", ".pdf"))
    with pytest.raises(ValueError, match="is a folder; accepted: a file path"):
        prepare_output(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot create its folder"):
        prepare_output(tmp_path / "file" / "run.json")  # a file where the folder should be
    monkeypatch.setattr(os, "access", lambda *_: False)  # as a read-only folder looks (root ignores modes)
    with pytest.raises(ValueError, match="run.json' is not writable"):
        prepare_output(tmp_path / "a" / "b" / "run.json")
