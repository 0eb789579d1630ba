"""A checkpoint's meta.json: covered by its digest (meta.sha256), its format version, the loader's `check`."""

from __future__ import annotations

import hashlib
import json

import pytest

from edgecl.runtime.checkpoint import load_checkpoint, save_checkpoint
from edgecl.runtime.errors import ArtifactError, CheckpointFormatError
from tests.runtime.test_checkpoint import assert_is_step, parts_for, rewrite_meta


@pytest.fixture
def three(tmp_path):
    """A root with checkpoints of steps 1, 2, 3 (keep=3); returns (root, [paths])."""
    return tmp_path, [save_checkpoint(tmp_path, parts_for(s), {"step": s}, keep=3) for s in (1, 2, 3)]


def test_meta_sha256_holds_the_digest_of_meta_json_as_sha256sum_writes_it(tmp_path):
    path = save_checkpoint(tmp_path, parts_for(5), {"step": 5})
    digest = hashlib.sha256((path / "meta.json").read_bytes()).hexdigest()
    assert (path / "meta.sha256").read_text() == f"{digest}  meta.json\n"
    assert json.loads((path / "meta.json").read_text())["format_version"] == 2


def _edit_step(text: str) -> str:  # as "epoch" 5 -> 15 in issue 11: a valid JSON, another number
    return text.replace('"step": 3', '"step": 13')


def _flip_key(text: str) -> str:  # one flipped bit in a key: still valid JSON
    return text.replace('"meta"', '"mfta"')


@pytest.mark.parametrize("edit, match", [
    (_edit_step, r"ckpt-000000003/meta\.json has sha256 [0-9a-f]{64}, expected [0-9a-f]{64} \(altered\)"),
    (_flip_key, r"ckpt-000000003/meta\.json has sha256 .* \(altered\)"),
])
def test_an_edited_meta_json_is_caught_by_its_digest_and_falls_back(three, edit, match):
    root, paths = three
    meta = paths[-1] / "meta.json"
    assert edit(meta.read_text()) != meta.read_text()
    meta.write_text(edit(meta.read_text()))
    with pytest.raises(ArtifactError, match=match):
        load_checkpoint(root)
    with pytest.warns(RuntimeWarning, match=match + r"; falling back to .*ckpt-000000002"):
        assert_is_step(load_checkpoint(root, fallback=True), 2)


@pytest.mark.parametrize("content, match", [
    (None, r"meta\.sha256 is missing"),
    (b"", r"meta\.sha256 is garbled; accepted: '<64 hex digits>  meta\.json'"),
    (b"0" * 64 + b"  meta.json\n", r"meta\.json has sha256 .* expected 0{64}"),
    (b"0" * 63 + b"  meta.json\n", r"meta\.sha256 is garbled"),
])
def test_a_missing_or_garbled_meta_digest_falls_back(three, content, match):
    root, paths = three
    digest = paths[-1] / "meta.sha256"
    digest.unlink() if content is None else digest.write_bytes(content)
    with pytest.raises(ArtifactError, match=match):
        load_checkpoint(root)
    with pytest.warns(RuntimeWarning, match=match):
        assert_is_step(load_checkpoint(root, fallback=True), 2)


def test_a_checkpoint_of_format_version_1_is_refused_naming_what_to_do(three):
    """As an edgecl before meta.sha256 wrote them: refused, with no fallback (the older ones are as old)."""
    root, paths = three
    for path in paths:
        record = json.loads((path / "meta.json").read_text())
        (path / "meta.json").write_text(json.dumps({**record, "format_version": 1}))
        (path / "meta.sha256").unlink()
    for fallback in (False, True):
        with pytest.raises(CheckpointFormatError, match=r"ckpt-000000003 was written by an earlier edgecl "
                           r"\(checkpoint format_version 1.*accepted: format_version 2: finish that run with the "
                           r"edgecl that started it, or start it again in a new or empty folder"):
            load_checkpoint(root, fallback=fallback)


def test_another_format_version_with_a_good_digest_is_refused(three):
    root, paths = three
    record = json.loads((paths[-1] / "meta.json").read_text())
    rewrite_meta(paths[-1], {**record, "format_version": 3})
    with pytest.raises(CheckpointFormatError, match="format_version 3; accepted: 2"):
        load_checkpoint(root, fallback=True)


def test_check_refusing_a_checkpoint_falls_back_and_other_errors_propagate(three):
    root, _ = three

    def no_step_3(ckpt):
        if ckpt.meta["step"] == 3:
            raise ArtifactError("step 3 is not a position of this run")

    with pytest.raises(ArtifactError, match="step 3 is not"):
        load_checkpoint(root, check=no_step_3)
    with pytest.warns(RuntimeWarning, match="step 3 is not a position of this run; falling back to .*ckpt-000000002"):
        assert_is_step(load_checkpoint(root, fallback=True, check=no_step_3), 2)

    def mismatch(ckpt):
        raise ValueError("other settings")

    with pytest.raises(ValueError, match="other settings"):
        load_checkpoint(root, fallback=True, check=mismatch)
