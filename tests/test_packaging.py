"""The wheel a board installs: built as the README says, without warnings, without writing into the
checkout, with the device profiles inside; and the repository keeps no profiler output."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _git(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60)


needs_git = pytest.mark.skipif(shutil.which("git") is None or _git("rev-parse").returncode != 0,
                               reason="needs a git checkout")


@needs_git
def test_the_wheel_builds_without_warnings_or_a_build_folder_in_the_checkout(tmp_path):
    pytest.importorskip("build", reason="`python -m build` (the dev extra) builds the wheel")
    checkout = tmp_path / "checkout"
    listed = _git("ls-files", "--cached", "--others", "--exclude-standard", "-z").stdout.split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, checkout / name)
    before = {p.name for p in checkout.iterdir()}
    # the README's command for the board's wheel
    out = subprocess.run([sys.executable, "-m", "build", "--outdir", str(tmp_path / "dist"), str(checkout)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "absent from the `packages` configuration" not in log
    assert "Warning" not in log, log[-3000:]
    assert not (checkout / "build").exists()
    assert {p.name for p in checkout.iterdir()} - before <= {"edgecl.egg-info"}  # gitignored, as for `pip install -e`
    (wheel,) = (tmp_path / "dist").glob("edgecl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    profiles = {f"edgecl/devices/profiles/{p.name}" for p in (ROOT / "devices" / "profiles").glob("*.toml")}
    assert profiles and profiles <= names
    assert "edgecl/devices/agent.py" in names and not any(n.startswith(("tests/", "results/")) for n in names)


@needs_git
def test_no_profiler_output_or_build_folder_is_tracked_and_both_are_ignored():
    tracked = _git("ls-files").stdout.split()
    assert not [n for n in tracked if n.startswith("onnxruntime_profile__") or n.startswith(("build/", "dist/"))]
    for name in ("onnxruntime_profile__2026-01-01_00-00-00.json", "build/lib/x.py", "dist/edgecl-0.1.0.tar.gz"):
        assert _git("check-ignore", "-q", "--no-index", name).returncode == 0, f"{name} is not ignored"
