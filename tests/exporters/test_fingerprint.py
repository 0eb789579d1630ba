"""The exporter fingerprint: recorded in manifests, and what keeps `bench run`'s export cache fresh."""

from __future__ import annotations

import importlib
import json

from edgecl.exporters.export import exporter_fingerprint, source_fingerprint
from tests.helpers import FAMILIES


def test_fingerprint_follows_every_source_byte_and_version(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    base = source_fingerprint([tmp_path], {"torch": "2.13.0"})
    assert base == source_fingerprint([tmp_path], {"torch": "2.13.0"})
    assert source_fingerprint([tmp_path], {"torch": "2.14.0"}) != base
    (tmp_path / "notes.txt").write_text("not source")
    assert source_fingerprint([tmp_path], {"torch": "2.13.0"}) == base
    # a byte moved from one file's end to the next file's start is still a different source
    (tmp_path / "a.py").write_text("x = 1\ny")
    (tmp_path / "b.py").write_text(" = 2\n")
    assert source_fingerprint([tmp_path], {"torch": "2.13.0"}) != base
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 3\n")
    assert source_fingerprint([tmp_path], {"torch": "2.13.0"}) != base
    (tmp_path / "b.py").write_text("y = 2\n")
    assert source_fingerprint([tmp_path], {"torch": "2.13.0"}) == base
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.py").write_text("z = 0\n")  # subpackages count
    assert source_fingerprint([tmp_path], {"torch": "2.13.0"}) != base


def test_fingerprint_covers_the_runtime_the_exporters_build_on():
    from pathlib import Path

    from edgecl.runtime import optim

    export_module = importlib.import_module("edgecl.exporters.export")  # the package's `export` is the function

    folders = [Path(export_module.__file__).parent, Path(optim.__file__).parent]
    assert exporter_fingerprint() == source_fingerprint(folders, export_module._versions())
    assert exporter_fingerprint() != source_fingerprint(folders[:1], export_module._versions())


def test_manifest_records_the_fingerprint(exported):
    _, folder = exported(FAMILIES[0])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["versions"]["edgecl.exporters"] == exporter_fingerprint()
    assert len(exporter_fingerprint()) == 12


def test_export_cache_reexports_after_an_exporter_change(tmp_path, monkeypatch):
    from edgecl.bench import cl_run

    export_module = importlib.import_module("edgecl.exporters.export")  # the package's `export` is the function

    job = cl_run.JobConfig(model="cnn", epochs=1)
    scenario = cl_run.load_scenario("digits", 0)
    monkeypatch.setattr(export_module, "exporter_fingerprint", lambda: "old")
    _, first = cl_run._export_cached(job, scenario, tmp_path)
    _, again = cl_run._export_cached(job, scenario, tmp_path)
    monkeypatch.setattr(export_module, "exporter_fingerprint", lambda: "new")
    _, second = cl_run._export_cached(job, scenario, tmp_path)
    assert first == again and second != first
    assert (first / "manifest.json").exists() and (second / "manifest.json").exists()
