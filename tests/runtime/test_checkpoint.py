"""Crash-safe checkpoints: round trip, retention, corruption caught (and fallback), crashed saves, SIGKILL."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgecl.runtime import checkpoint as ckpt_mod
from edgecl.runtime.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from edgecl.runtime.errors import ArtifactError


def parts_for(step: int) -> dict:
    """Parts whose every value encodes `step`, so a loaded checkpoint can be checked against its meta."""
    return {
        "engine": {"w": np.full((3, 4), step, dtype=np.float32), "steps_done": np.array(step, dtype=np.int64)},
        "buffer": {"x": np.full((5, 2), step % 256, dtype=np.uint8), "seen": np.arange(4) < step % 5},
        "loop": {"step": np.array(step)},
    }


def assert_is_step(ckpt: Checkpoint, step: int) -> None:
    assert ckpt.meta["step"] == step
    assert ckpt.parts["loop"]["step"] == step
    np.testing.assert_array_equal(ckpt.parts["engine"]["w"], np.full((3, 4), step, dtype=np.float32))


def ckpt_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("ckpt-"))


@pytest.fixture
def three(tmp_path):
    """A root with checkpoints of steps 1, 2, 3 (keep=3); returns (root, [paths])."""
    paths = [save_checkpoint(tmp_path, parts_for(s), {"step": s}, keep=3) for s in (1, 2, 3)]
    return tmp_path, paths


# --- round trip --------------------------------------------------------------------------------


def test_round_trip_keeps_dtypes_shapes_and_values(tmp_path):
    parts = {
        "engine": {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "lr": np.float32(0.1),
                   "b": np.array([1.5, np.nan, -np.inf], dtype=np.float64)},
        "buffer": {"ids": np.arange(7, dtype=np.int64) - 3, "mask": np.array([True, False, True]),
                   "images": np.arange(24, dtype=np.uint8).reshape(2, 3, 4), "empty": np.zeros((0, 3), np.int16)},
        "loop": {"step": np.array(42), "flag": np.array(True)},
        "odd-names": {"file": np.ones(2), "allow_pickle": np.zeros(1), "arr_0": np.array(7)},
    }
    meta = {"step": 42, "task": 3, "name": "run-α", "history": [0.5, 0.25], "nested": {"a": None}}
    path = save_checkpoint(tmp_path, parts, meta)
    assert path.parent == tmp_path and path.name.startswith("ckpt-")
    assert (tmp_path / "LATEST").read_text().strip() == path.name

    loaded = load_checkpoint(tmp_path)
    assert loaded.path == path and loaded.meta == meta
    assert loaded.parts.keys() == parts.keys()
    for part, arrays in parts.items():
        assert loaded.parts[part].keys() == arrays.keys()
        for key, want in arrays.items():
            got = loaded.parts[part][key]
            assert got.dtype == np.asarray(want).dtype and got.shape == np.shape(want), (part, key)
            np.testing.assert_array_equal(got, want)
    assert loaded.parts["loop"]["step"].shape == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.meta = {}


@settings(max_examples=25, deadline=None)
@given(arrays=st.dictionaries(
    st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True),
    hnp.arrays(st.sampled_from([np.float32, np.int64, np.bool_, np.uint8, np.int8, np.float16]),
               hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)),
    max_size=4))
def test_round_trip_any_arrays(arrays):
    with tempfile.TemporaryDirectory() as root:
        save_checkpoint(root, {"p": arrays}, {"step": 0})
        got = load_checkpoint(root).parts["p"]
        assert got.keys() == arrays.keys()
        for key, want in arrays.items():
            assert got[key].dtype == want.dtype and got[key].shape == want.shape
            np.testing.assert_array_equal(got[key], want)


def test_meta_json_records_sha_and_size_of_every_part(tmp_path):
    path = save_checkpoint(tmp_path, parts_for(5), {"step": 5})
    record = json.loads((path / "meta.json").read_text())
    assert record["meta"] == {"step": 5}
    assert set(record["files"]) == {"engine.npz", "buffer.npz", "loop.npz"}
    for name, entry in record["files"].items():
        assert entry["bytes"] == (path / name).stat().st_size
        assert entry["sha256"] == ckpt_mod.sha256_file(path / name)


def test_empty_root_gives_none(tmp_path):
    assert load_checkpoint(tmp_path) is None
    assert load_checkpoint(tmp_path / "does-not-exist") is None


# --- retention --------------------------------------------------------------------------------


def test_keep_two_keeps_the_newest_two(tmp_path):
    for step in range(1, 6):
        path = save_checkpoint(tmp_path, parts_for(step), {"step": step}, keep=2)
        assert len(ckpt_dirs(tmp_path)) == min(step, 2)
    assert ckpt_dirs(tmp_path) == ["ckpt-000000004", "ckpt-000000005"] and path.name == "ckpt-000000005"
    assert_is_step(load_checkpoint(tmp_path), 5)
    assert sorted(os.listdir(tmp_path)) == [".lock", "LATEST", "ckpt-000000004", "ckpt-000000005"]


def test_keep_one_deletes_the_old_one_only_after_the_new_one_is_in_place(tmp_path):
    save_checkpoint(tmp_path, parts_for(1), {"step": 1}, keep=1)
    save_checkpoint(tmp_path, parts_for(2), {"step": 2}, keep=1)
    assert ckpt_dirs(tmp_path) == ["ckpt-000000002"]
    assert_is_step(load_checkpoint(tmp_path), 2)


def test_numbers_keep_increasing_after_deletions(tmp_path):
    for step in range(3):
        save_checkpoint(tmp_path, parts_for(step), {"step": step}, keep=1)
    assert ckpt_dirs(tmp_path) == ["ckpt-000000003"]


# --- corruption --------------------------------------------------------------------------------


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_raises_naming_the_file(three):
    root, paths = three
    flip_byte(paths[-1] / "engine.npz")
    with pytest.raises(ArtifactError, match=r"ckpt-000000003/engine\.npz has sha256 .* expected"):
        load_checkpoint(root)


def test_flipped_byte_with_fallback_warns_and_loads_the_previous(three):
    root, paths = three
    flip_byte(paths[-1] / "buffer.npz")
    with pytest.warns(RuntimeWarning, match=r"buffer\.npz.*falling back to .*ckpt-000000002"):
        loaded = load_checkpoint(root, fallback=True)
    assert loaded.path == paths[1]
    assert_is_step(loaded, 2)


def test_fallback_skips_every_corrupt_one(three):
    root, paths = three
    flip_byte(paths[2] / "loop.npz")
    (paths[1] / "engine.npz").unlink()
    with pytest.warns(RuntimeWarning):
        assert_is_step(load_checkpoint(root, fallback=True), 1)


def test_fallback_raises_when_nothing_verifies(three):
    root, paths = three
    for path in paths:
        flip_byte(path / "engine.npz")
    with pytest.warns(RuntimeWarning), pytest.raises(ArtifactError, match="no checkpoint under .* verifies"):
        load_checkpoint(root, fallback=True)


def test_truncated_part_raises(three):
    root, paths = three
    part = paths[-1] / "engine.npz"
    part.write_bytes(part.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match=r"engine\.npz is \d+ bytes, expected \d+ \(truncated"):
        load_checkpoint(root)
    with pytest.warns(RuntimeWarning):
        assert_is_step(load_checkpoint(root, fallback=True), 2)


def test_missing_part_raises(three):
    root, paths = three
    (paths[-1] / "loop.npz").unlink()
    with pytest.raises(ArtifactError, match=r"ckpt-000000003/loop\.npz is missing"):
        load_checkpoint(root)


def test_deleted_meta_json_raises_and_falls_back(three):
    root, paths = three
    (paths[-1] / "meta.json").unlink()
    with pytest.raises(ArtifactError, match=r"ckpt-000000003/meta\.json is missing"):
        load_checkpoint(root)
    with pytest.warns(RuntimeWarning, match="meta.json is missing"):
        assert_is_step(load_checkpoint(root, fallback=True), 2)


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'{"files": {}, "meta": {}}'])
def test_unreadable_meta_json_raises(three, content):
    root, paths = three
    (paths[-1] / "meta.json").write_bytes(content)
    with pytest.raises(ArtifactError, match=r"ckpt-000000003/meta\.json"):
        load_checkpoint(root)


def rewrite_meta(folder: Path, record: dict) -> None:
    """Write meta.json and a digest that matches it: an edit the digest cannot catch."""
    data = json.dumps(record).encode()
    (folder / "meta.json").write_bytes(data)
    (folder / "meta.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  meta.json\n")


def test_part_with_matching_sha_but_not_an_npz_raises(tmp_path):
    path = save_checkpoint(tmp_path, parts_for(1), {"step": 1})
    (path / "loop.npz").write_bytes(b"not a zip file at all")
    record = json.loads((path / "meta.json").read_text())
    record["files"]["loop.npz"] = {"sha256": ckpt_mod.sha256_file(path / "loop.npz"),
                                   "bytes": (path / "loop.npz").stat().st_size}
    rewrite_meta(path, record)
    with pytest.raises(ArtifactError, match=r"loop\.npz is not a readable npz"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("content", [b"", b"garbage\n", b"ckpt-12\n", b"\x00\xff", b"ckpt-000000099\n"])
def test_garbled_latest_uses_the_newest_folder(three, content):
    root, paths = three
    (root / "LATEST").write_bytes(content)
    if content == b"ckpt-000000099\n":  # well formed but names nothing: corruption, not a garble
        with pytest.raises(ArtifactError, match="ckpt-000000099 is missing"):
            load_checkpoint(root)
        with pytest.warns(RuntimeWarning):
            assert_is_step(load_checkpoint(root, fallback=True), 3)
        return
    with pytest.warns(RuntimeWarning, match="LATEST is garbled; using the newest checkpoint .*ckpt-000000003"):
        assert_is_step(load_checkpoint(root), 3)


def test_missing_latest_uses_the_newest_folder_and_verifies_it(three):
    """As after a kill between the first folder rename and the first LATEST: no warning."""
    root, paths = three
    (root / "LATEST").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_is_step(load_checkpoint(root), 3)
    flip_byte(paths[-1] / "engine.npz")
    with pytest.raises(ArtifactError, match=r"engine\.npz has sha256"):
        load_checkpoint(root)
    with pytest.warns(RuntimeWarning):
        assert_is_step(load_checkpoint(root, fallback=True), 2)


def test_save_after_garbled_latest_continues_numbering(three):
    root, _ = three
    (root / "LATEST").write_bytes(b"???")
    path = save_checkpoint(root, parts_for(4), {"step": 4})
    assert path.name == "ckpt-000000004"
    assert_is_step(load_checkpoint(root), 4)


def test_latest_naming_a_missing_folder_with_no_folders_raises(tmp_path):
    (tmp_path / "LATEST").write_text("ckpt-000000001\n")
    with pytest.raises(ArtifactError, match="is missing"):
        load_checkpoint(tmp_path)
    (tmp_path / "LATEST").write_text("junk")
    with pytest.raises(ArtifactError, match="garbled"):
        load_checkpoint(tmp_path)


# --- crashed saves ------------------------------------------------------------------------------


def test_stale_temp_dir_from_a_crash_is_ignored_then_cleaned(three):
    root, _ = three
    stale = root / ".tmp-ckpt-000000004-abc1_x9z"  # the names tempfile.mkdtemp and write_atomic give
    stale.mkdir()
    (stale / "engine.npz").write_bytes(b"half written")
    (root / ".tmp-LATEST-0a1b2c3d").write_bytes(b"ckpt-0000")
    doomed = root / ".tmp-del-ckpt-000000000"
    doomed.mkdir()
    assert_is_step(load_checkpoint(root), 3)
    save_checkpoint(root, parts_for(4), {"step": 4}, keep=2)
    assert sorted(os.listdir(root)) == [".lock", "LATEST", "ckpt-000000003", "ckpt-000000004"]


def test_a_users_own_tmp_files_survive_saves(tmp_path):
    """Issue 11: a user's `.tmp-*` file in a --checkpoint folder was deleted by the next save."""
    mine = [".tmp-mine.txt", ".tmp-notes", ".tmp-ckpt-draft", ".tmp-LATEST-old", ".tmp-del-ckpt-1", ".tmp-"]
    for name in mine:
        (tmp_path / name).write_text("mine")
    (tmp_path / ".tmp-dir").mkdir()
    (tmp_path / ".tmp-dir" / "thesis.txt").write_text("mine")
    for step in range(1, 4):
        save_checkpoint(tmp_path, parts_for(step), {"step": step}, keep=1)
    assert all((tmp_path / name).read_text() == "mine" for name in mine)
    assert (tmp_path / ".tmp-dir" / "thesis.txt").read_text() == "mine"
    assert_is_step(load_checkpoint(tmp_path), 3)


def test_only_a_stale_temp_dir_counts_as_no_checkpoint(tmp_path):
    (tmp_path / ".tmp-ckpt-000000001-abc").mkdir()
    assert load_checkpoint(tmp_path) is None


def test_checkpoint_renamed_but_latest_not_yet_replaced(three):
    """A kill between the folder rename and the LATEST replace: the old LATEST still wins, and the next
    save neither reuses the orphan's number nor loses anything."""
    root, paths = three
    (root / "LATEST").write_text("ckpt-000000002\n")  # as if ckpt-3 was renamed in just before the kill
    assert_is_step(load_checkpoint(root), 2)
    path = save_checkpoint(root, parts_for(4), {"step": 4}, keep=2)
    assert path.name == "ckpt-000000004"
    assert ckpt_dirs(root) == ["ckpt-000000003", "ckpt-000000004"]


def test_failed_save_leaves_previous_checkpoints_and_latest_untouched(three, monkeypatch):
    root, _ = three
    before = sorted(os.listdir(root))
    calls = []

    def failing_write(f, arrays):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        ckpt_mod.zipfile.ZipFile(f, "w").close()

    monkeypatch.setattr(ckpt_mod, "_write_npz", failing_write)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(root, parts_for(4), {"step": 4}, keep=1)
    assert sorted(os.listdir(root)) == before
    assert_is_step(load_checkpoint(root), 3)


def test_latest_pointing_to_an_older_one_is_never_pruned(three):
    root, _ = three
    (root / "LATEST").write_text("ckpt-000000001\n")
    # A save moves LATEST on; retention then removes ckpt-1, but never while LATEST names it.
    ckpt_mod._prune(root, keep=1)
    assert ckpt_dirs(root) == ["ckpt-000000001", "ckpt-000000003"]


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("parts, meta, keep, match", [
    ({"a": {"x": np.zeros(2)}}, {}, 0, "keep=0"),
    ({"a": {"x": np.zeros(2)}}, {}, True, "keep=True"),
    ({"../evil": {"x": np.zeros(2)}}, {}, 2, "part name '../evil'"),
    ({"": {"x": np.zeros(2)}}, {}, 2, "part name ''"),
    ({"a": [np.zeros(2)]}, {}, 2, "part 'a' must be a dict"),
    ({"a": {"x/y": np.zeros(2)}}, {}, 2, "array name 'x/y'"),
    ({"a": {"x": np.array([{}, None], dtype=object)}}, {}, 2, "dtype object"),
    ({"a": {"x": np.zeros(2)}}, {"bad": np.zeros(2)}, 2, "not JSON-serialisable"),
    ({"a": {"x": np.zeros(2)}}, {"nan": float("nan")}, 2, "not JSON-serialisable"),
    ({"a": {"x": np.zeros(2)}}, [1], 2, "meta must be a dict"),
])
def test_bad_input_raises_value_error_and_writes_nothing(tmp_path, parts, meta, keep, match):
    with pytest.raises(ValueError, match=match):
        save_checkpoint(tmp_path / "root", parts, meta, keep=keep)
    assert not (tmp_path / "root").exists()


# --- SIGKILL -----------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from edgecl.runtime.checkpoint import load_checkpoint, save_checkpoint
    root = sys.argv[1]
    previous = load_checkpoint(root)
    step = 0 if previous is None else previous.meta["step"] + 1
    print("ready", flush=True)
    while True:
        save_checkpoint(root, {"loop": {"step": np.array(step)},
                               "buffer": {"x": np.full(100_000, step, dtype=np.int64)},
                               "engine": {"w": np.full((64, 64), step, dtype=np.float32)}},
                        {"step": step}, keep=2)
        step += 1
""")


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and directory fsync are POSIX")
def test_sigkill_at_random_moments_never_leaves_an_unloadable_root(tmp_path):
    delays = random.Random(20240601)
    steps = []
    started = time.monotonic()
    for _ in range(12):
        if time.monotonic() - started > 15:  # a slow machine runs fewer kills rather than a long test
            break
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready", child.stderr.read()
            time.sleep(delays.uniform(0.0, 0.25))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=10)
            child.stdout.close()
            child.stderr.close()
        assert child.returncode == -signal.SIGKILL  # it was still saving, not dead of an error

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # not even a garbled LATEST
            loaded = load_checkpoint(tmp_path)  # never raises, never falls back
        if loaded is None:
            assert not steps, "a checkpoint existed before and is gone"
            continue
        step = loaded.meta["step"]
        assert loaded.parts["loop"]["step"] == step
        np.testing.assert_array_equal(loaded.parts["buffer"]["x"], np.full(100_000, step, dtype=np.int64))
        np.testing.assert_array_equal(loaded.parts["engine"]["w"], np.full((64, 64), step, dtype=np.float32))
        assert not steps or step >= steps[-1], "went back in time"
        steps.append(step)
        assert len(ckpt_dirs(tmp_path)) <= 3  # keep=2, plus one renamed in before its LATEST
    assert len(steps) >= 3 and steps[-1] > 0, f"too few kills landed after a checkpoint: {steps}"
