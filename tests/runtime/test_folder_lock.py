"""One writer per folder (locks.FolderLock), as checkpoints use it: a second writer refused naming the folder."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from edgecl.runtime.checkpoint import CheckpointWriter, load_checkpoint, save_checkpoint
from edgecl.runtime.errors import FolderBusyError
from tests.runtime.test_checkpoint import assert_is_step, parts_for


HOLDER = textwrap.dedent("""
    import sys
    from edgecl.runtime.checkpoint import CheckpointWriter
    with CheckpointWriter(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()
""")


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX")
def test_a_second_writer_is_refused_naming_the_folder_while_the_first_holds_it(tmp_path):
    """Issue 11: two runs on one folder pruned each other's `.tmp-` folders; the second must be refused."""
    root = tmp_path
    for step in (1, 2, 3):
        save_checkpoint(root, parts_for(step), {"step": step}, keep=3)
    before = sorted(os.listdir(root))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        busy = rf"checkpoint folder '{root}' is in use: another process writes into it .*fuser"
        with pytest.raises(FolderBusyError, match=busy):
            save_checkpoint(root, parts_for(4), {"step": 4})
        with pytest.raises(FolderBusyError, match=busy):
            CheckpointWriter(root)
        assert sorted(os.listdir(root)) == before
        assert_is_step(load_checkpoint(root), 3)  # reading takes no lock
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0
    assert save_checkpoint(root, parts_for(4), {"step": 4}).name == "ckpt-000000004"  # released with the process


def test_a_writer_holds_the_folder_until_closed(tmp_path):
    with CheckpointWriter(tmp_path) as writer:
        writer.save(parts_for(1), {"step": 1})
        with pytest.raises(FolderBusyError):
            save_checkpoint(tmp_path, parts_for(2), {"step": 2})
        writer.save(parts_for(2), {"step": 2})
    assert_is_step(load_checkpoint(tmp_path), 2)
    with pytest.raises(ValueError, match="is closed"):
        writer.save(parts_for(3), {"step": 3})
    save_checkpoint(tmp_path, parts_for(3), {"step": 3})


def test_a_file_as_root_is_refused_and_left_alone(tmp_path):
    (tmp_path / "f").write_text("mine")
    with pytest.raises(ValueError, match=r"checkpoint folder '.*f' is a file; accepted: a folder"):
        save_checkpoint(tmp_path / "f", parts_for(1), {"step": 1})
    with pytest.raises(ValueError, match=r"checkpoint folder '.*f/sub' cannot be created"):
        save_checkpoint(tmp_path / "f" / "sub", parts_for(1), {"step": 1})
    assert (tmp_path / "f").read_text() == "mine"


ADOPTER = textwrap.dedent("""
    import sys
    import numpy as np
    from edgecl.runtime.checkpoint import CheckpointWriter
    with CheckpointWriter(sys.argv[1], lock_fd=int(sys.argv[2])) as writer:
        writer.save({"engine": {"w": np.arange(3.0)}}, {"step": 2})
        print("saved", flush=True)
        sys.stdin.readline()
""")


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX")
def test_a_child_process_writes_into_the_folder_its_parent_locked_and_holds_it_after_the_parent(tmp_path):
    """`edgecl run`: the host locks the checkpoint folder before the export; its training process writes there."""
    with CheckpointWriter(tmp_path) as writer:
        writer.save(parts_for(1), {"step": 1})
        fd = writer.lock_fileno()
        child = subprocess.Popen([sys.executable, "-c", ADOPTER, str(tmp_path), str(fd)], pass_fds=(fd,),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "saved"
        except BaseException:
            child.kill()
            raise
    try:
        assert load_checkpoint(tmp_path).meta["step"] == 2
        with pytest.raises(FolderBusyError, match="is in use"):  # the parent let go: the child's descriptor holds it
            CheckpointWriter(tmp_path)
    finally:
        child.communicate("\n", timeout=30)
    assert child.returncode == 0
    CheckpointWriter(tmp_path).close()  # free once neither holds it


def test_only_a_descriptor_holding_the_lock_is_adopted(tmp_path):
    with CheckpointWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match="lock descriptor True .*accepted: an integer file descriptor"):
            CheckpointWriter(tmp_path, lock_fd=True)
        other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT)
        again = os.open(tmp_path / ".lock", os.O_RDWR)  # the same file, but not the descriptor that locked it
        try:
            with pytest.raises(ValueError, match=rf"lock descriptor {other} is not a descriptor of '.*\.lock'"):
                CheckpointWriter(tmp_path, lock_fd=other)
            with pytest.raises(FolderBusyError, match="is in use"):
                CheckpointWriter(tmp_path, lock_fd=again)
        finally:
            os.close(other)
            os.close(again)
        with pytest.raises(ValueError, match="cannot be checked"):
            CheckpointWriter(tmp_path, lock_fd=other)  # closed now
        adopted = CheckpointWriter(tmp_path, lock_fd=os.dup(writer.lock_fileno()))
        adopted.save(parts_for(1), {"step": 1})
        adopted.close()
        with pytest.raises(FolderBusyError, match="is in use"):  # closing the adopted descriptor left the lock held
            CheckpointWriter(tmp_path)
        writer.save(parts_for(2), {"step": 2})
    with pytest.raises(ValueError, match="was released"):
        writer.lock_fileno()
