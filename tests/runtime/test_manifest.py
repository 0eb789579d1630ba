"""The manifest protects itself: its own sha256 beside it, its whole schema, a sha256 for every file an engine opens."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgecl.runtime import ArtifactError, load_manifest, open_engine
MANIFEST_NAME, DIGEST_NAME = "manifest.json", "manifest.sha256"  # the names are part of the artifact format


@pytest.fixture
def folder(exported, tmp_path):
    """A private copy of an exported portable mlp (masks on every weight)."""
    _, source = exported("mlp")
    copy_dir = tmp_path / "art"
    shutil.copytree(source, copy_dir)
    return copy_dir


def read(folder) -> dict:
    return json.loads((folder / MANIFEST_NAME).read_text())


def write(folder, manifest, digest: bool = False) -> None:
    """Write `manifest` as manifest.json; with digest=True also a matching manifest.sha256 (a consistent forgery,
    which only the schema can catch)."""
    data = json.dumps(manifest).encode()
    (folder / MANIFEST_NAME).write_bytes(data)
    if digest:
        (folder / DIGEST_NAME).write_text(f"{hashlib.sha256(data).hexdigest()}  {MANIFEST_NAME}\n")


def test_export_writes_the_manifest_digest_in_sha256sum_format(folder):
    line = (folder / DIGEST_NAME).read_text()
    assert line == f"{hashlib.sha256((folder / MANIFEST_NAME).read_bytes()).hexdigest()}  {MANIFEST_NAME}\n"


@pytest.mark.parametrize("edit", ["files-emptied", "trainable-flipped", "list", "null"])
def test_an_edited_manifest_is_refused_by_name(folder, edit):
    manifest = read(folder)
    if edit == "files-emptied":
        manifest["files"] = {}
    elif edit == "trainable-flipped":
        manifest["parameters"][0]["trainable"] = False
    else:
        manifest = [] if edit == "list" else None
    write(folder, manifest)
    with pytest.raises(ArtifactError, match=r"manifest\.json.*edited or damaged"):
        open_engine(folder)
    with pytest.raises(ArtifactError, match=r"manifest\.json.*edited or damaged"):
        load_manifest(folder, verify=False)


def test_a_missing_or_malformed_digest_is_refused(folder):
    (folder / DIGEST_NAME).write_text("not a digest\n")
    with pytest.raises(ArtifactError, match=r"manifest\.sha256.*malformed"):
        open_engine(folder)
    (folder / DIGEST_NAME).unlink()
    with pytest.raises(ArtifactError, match=r"no manifest\.sha256 beside .*manifest\.json"):
        open_engine(folder)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(files={}), r"a sha256 entry for every file the portable engine opens.*missing: init_state"),
    (lambda m: m["files"].pop("step.onnx"), r"missing: step\.onnx"),
    (lambda m: m["parameters"][0].update(trainable=False), r"extra\.step_outputs"),
    (lambda m: m["parameters"][0].update(trainable="yes"),
     r"parameters\[0\]\.trainable = 'yes'; accepted: true or false"),
    (lambda m: m.update(num_classes=0), r"num_classes = 0; accepted: an integer >= 2"),
    (lambda m: m.update(input_shape=[1, 0, 8]), r"input_shape\[1\] = 0"),
    (lambda m: m.update(input_shape="1x8x8"), r"input_shape = '1x8x8'"),
    (lambda m: m["parameters"][0].update(shape=None), r"parameters\[0\]\.shape = None"),
    (lambda m: m.update(parameters=[]), r"parameters = \[\]; accepted: a non-empty list"),
    (lambda m: m.update(engine="tflite"), r"engine = 'tflite'; accepted: portable, ort-training"),
    (lambda m: m["extra"].pop("step_outputs"), r"'step_outputs'"),
    (lambda m: m["extra"].update(activation_bytes_per_sample=-1), r"activation_bytes_per_sample = -1"),
    (lambda m: m["files"]["step.onnx"].update(sha256="0" * 63), r"files\['step\.onnx'\]\.sha256"),
    (lambda m: m["files"].update({"../x": {"sha256": "0" * 64, "bytes": 1}}), r"files key = '\.\./x'"),
    (lambda m: m.update(surprise=1), r"unknown \['surprise'\]"),
    (lambda m: m.pop("buffers"), r"missing \['buffers'\]"),
])
def test_the_schema_is_checked_even_when_the_digest_matches(folder, edit, message):
    manifest = read(folder)
    edit(manifest)
    write(folder, manifest, digest=True)
    with pytest.raises(ArtifactError, match=message) as e:
        open_engine(folder)
    assert "manifest.json" in str(e.value)


def test_a_manifest_that_is_not_json_is_refused(folder):
    data = b"{not json"
    (folder / MANIFEST_NAME).write_bytes(data)
    (folder / DIGEST_NAME).write_text(f"{hashlib.sha256(data).hexdigest()}  {MANIFEST_NAME}\n")
    with pytest.raises(ArtifactError, match=r"manifest\.json.*not valid JSON"):
        load_manifest(folder)


@pytest.mark.parametrize("value", [[], None, 3, "text"])
def test_a_manifest_that_is_not_an_object_is_refused(folder, value):
    write(folder, value, digest=True)
    with pytest.raises(ArtifactError, match="accepted: a JSON object"):
        load_manifest(folder)


@pytest.mark.ort_training
@pytest.mark.parametrize("edit, message", [
    (lambda m: m["files"].pop("optimizer_sgd.onnx"), r"missing: optimizer_sgd\.onnx"),
    (lambda m: m["files"].pop("checkpoint"), r"missing: checkpoint"),
    (lambda m: m["extra"]["param_graph_names"].popitem(), r"extra\.param_graph_names"),
    (lambda m: m["extra"].update(batchnorm=[{"mean": "nope", "var": "nope", "momentum": 0.1, "spatial": 4}]),
     r"extra\.batchnorm\[0\]\.mean = 'nope'"),
    (lambda m: m["extra"]["adamw"].update(betas=[0.9]), r"extra\.adamw\.betas"),
])
def test_the_ort_training_schema_is_checked(exported, tmp_path, edit, message):
    _, source = exported("mlp", "ort-training")
    folder = tmp_path / "art"
    shutil.copytree(source, folder)
    manifest = read(folder)
    edit(manifest)
    write(folder, manifest, digest=True)
    with pytest.raises(ArtifactError, match=message):
        load_manifest(folder)


SCALARS = st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8)
JSON = st.recursive(SCALARS,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=6)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_any_field_replaced_by_any_json_gives_an_artifact_error_or_a_valid_manifest(exported, folder, data):
    original = read(exported("mlp")[1])  # the untouched export (`folder` is rewritten by every example)
    paths = [p for p in _paths(original) if p]
    path = data.draw(st.sampled_from(paths), label="path")
    manifest = copy.deepcopy(original)
    target = manifest
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = data.draw(JSON, label="value")
    write(folder, manifest, digest=True)
    try:
        load_manifest(folder, verify=False)
    except ArtifactError as e:
        assert "manifest.json" in str(e)
