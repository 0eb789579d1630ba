"""The schema of `manifest.json`, checked field by field before a manifest is used.

`check_manifest_dict` refuses anything an engine could trip over later: a field of the
wrong type or range, a parameter list that does not match the engine's graph inputs and
outputs, and a `files` table without a sha256 for a file the engine opens (an empty table
would switch off every file check). Each error names the manifest file, the field, the
value found and what is accepted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from .errors import ArtifactError

# Files every artifact folder holds, and those each engine opens besides (their sha256 is required).
COMMON_FILES = ("init_state.npz", "model.onnx")
ENGINE_FILES = {
    "portable": ("step.onnx", "forward.onnx"),
    "ort-training": ("training_model.onnx", "eval_model.onnx", "checkpoint"),
}
BATCH_INPUTS = ("x", "y", "sample_weight", "target_logits", "logit_weight")
TOP_LEVEL = {"format_version", "engine", "input_shape", "num_classes", "parameters", "buffers", "files", "opset",
             "ir_version", "versions", "model_name", "extra"}
SPEC_KEYS = {"name", "shape", "dtype", "trainable", "masked", "graph_name"}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Fields:
    """Checks on the fields of one manifest; every failure is an ArtifactError naming the file."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, value, accepted: str):
        raise ArtifactError(f"manifest {self.where}: {field} = {_show(value)}; accepted: {accepted} "
                            "(export the artifacts again)")

    def mapping(self, field: str, value, keys=None, optional=()) -> Mapping:
        if not isinstance(value, dict):
            self.fail(field, value, f"an object{' with ' + ', '.join(sorted(keys)) if keys else ''}")
        if keys is not None:
            missing, unknown = set(keys) - set(value) - set(optional), set(value) - set(keys)
            if missing or unknown:
                self.fail(field, value, f"an object with exactly the keys {', '.join(sorted(keys))} "
                          f"(missing {sorted(missing)}, unknown {sorted(unknown)})")
        return value

    def integer(self, field: str, value, low: int, high: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            self.fail(field, value, f"an integer >= {low}" + (f" and <= {high}" if high is not None else ""))
        return value

    def number(self, field: str, value, low: float, high: float, low_open: bool = False) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not (value > low if low_open else value >= low) or value > high:
            self.fail(field, value, f"a finite number in {'(' if low_open else '['}{low}, {high}]")
        return value

    def boolean(self, field: str, value) -> bool:
        if not isinstance(value, bool):
            self.fail(field, value, "true or false")
        return value

    def string(self, field: str, value, empty: bool = False) -> str:
        if not isinstance(value, str) or (not empty and not value):
            self.fail(field, value, "a string" if empty else "a non-empty string")
        return value

    def strings(self, field: str, value) -> list[str]:
        if not isinstance(value, list):
            self.fail(field, value, "a list of strings")
        return [self.string(f"{field}[{i}]", v) for i, v in enumerate(value)]

    def choice(self, field: str, value, choices, accepted: str) -> str:
        if not isinstance(value, str) or value not in choices:
            self.fail(field, value, accepted)
        return value

    def equal(self, field: str, value, expected):
        if value != expected:
            self.fail(field, value, _show(expected))
        return value

    def shape(self, field: str, value, min_len: int = 0) -> tuple[int, ...]:
        if not isinstance(value, list) or len(value) < min_len:
            self.fail(field, value, f"a list of at least {min_len} integers >= 1")
        return tuple(self.integer(f"{field}[{i}]", d, 1) for i, d in enumerate(value))

    def specs(self, field: str, value, parameters: bool) -> list[dict]:
        if not isinstance(value, list) or (parameters and not value):
            self.fail(field, value, "a non-empty list of tensor specs" if parameters else "a list of tensor specs")
        seen = set()
        for i, spec in enumerate(value):
            at = f"{field}[{i}]"
            self.mapping(at, spec, SPEC_KEYS)
            name = self.string(f"{at}.name", spec["name"])
            if name in seen:
                self.fail(f"{at}.name", name, "a name used once")
            seen.add(name)
            self.shape(f"{at}.shape", spec["shape"])
            self.equal(f"{at}.dtype", spec["dtype"], "float32")
            self.string(f"{at}.graph_name", spec["graph_name"])
            if parameters:
                self.boolean(f"{at}.trainable", spec["trainable"])
                self.boolean(f"{at}.masked", spec["masked"])
            else:
                self.equal(f"{at}.trainable", spec["trainable"], False)
                self.equal(f"{at}.masked", spec["masked"], False)
        return value


def check_manifest_dict(d, where: str) -> None:
    """Check a parsed `manifest.json` against the schema the exporter writes.

    Args:
        d: the parsed JSON. where: how to name the manifest in errors (its path, quoted).
    Raises:
        ArtifactError: naming the file, the field, the value and what is accepted.
    """
    f = _Fields(where)
    if not isinstance(d, dict):
        f.fail("the whole manifest", d, "a JSON object")
    f.mapping("the manifest", d, TOP_LEVEL)
    f.equal("format_version", d["format_version"], 1)
    engine = f.choice("engine", d["engine"], ENGINE_FILES, ", ".join(ENGINE_FILES))
    f.shape("input_shape", d["input_shape"], min_len=1)
    f.integer("num_classes", d["num_classes"], 2)
    params = f.specs("parameters", d["parameters"], parameters=True)
    buffers = f.specs("buffers", d["buffers"], parameters=False)
    if not any(p["trainable"] for p in params):
        f.fail("parameters[*].trainable", [p["trainable"] for p in params], "at least one trainable parameter")
    clash = {p["name"] for p in params} & {b["name"] for b in buffers}
    if clash:
        f.fail("buffers[*].name", sorted(clash), "names that are not parameter names")
    f.integer("opset", d["opset"], 13, 21)
    f.integer("ir_version", d["ir_version"], 3)
    f.mapping("versions", d["versions"])
    for k, v in d["versions"].items():
        f.string(f"versions[{k!r}]", v)
    f.string("model_name", d["model_name"], empty=True)
    extra = f.mapping("extra", d["extra"])
    _check_files(f, d["files"], engine, extra)
    _check_common_extra(f, extra, params)
    (_check_portable_extra if engine == "portable" else _check_ort_training_extra)(f, extra, params, buffers)


def _check_files(f: _Fields, files, engine: str, extra: Mapping) -> None:
    f.mapping("files", files)
    for name, entry in files.items():
        if not _FILE_NAME.fullmatch(name) or name.startswith("manifest."):
            f.fail("files key", name, "a plain file name of the folder (not the manifest's own files)")
        f.mapping(f"files[{name!r}]", entry, {"sha256", "bytes"})
        if not isinstance(entry["sha256"], str) or not _SHA256.fullmatch(entry["sha256"]):
            f.fail(f"files[{name!r}].sha256", entry["sha256"], "64 lowercase hex digits")
        f.integer(f"files[{name!r}].bytes", entry["bytes"], 0)
    needed = [*COMMON_FILES, *ENGINE_FILES[engine]]
    if engine == "ort-training" and isinstance(extra.get("optimizer_files"), dict):
        needed += [v for v in extra["optimizer_files"].values() if isinstance(v, str)]
    missing = [n for n in needed if n not in files]
    if missing:
        f.fail("files", sorted(files), f"a sha256 entry for every file the {engine} engine opens "
               f"({', '.join(needed)}); missing: {', '.join(missing)}")


def _check_common_extra(f: _Fields, extra: Mapping, params: list[dict]) -> None:
    names = {p["name"] for p in params}
    if "dropout" in extra:
        f.boolean("extra.dropout", extra["dropout"])
    if "activation_bytes_per_sample" in extra:
        f.integer("extra.activation_bytes_per_sample", extra["activation_bytes_per_sample"], 0)
    if "layers" not in extra:
        return
    if not isinstance(extra["layers"], list):
        f.fail("extra.layers", extra["layers"], "a list of layer objects")
    for i, row in enumerate(extra["layers"]):
        at = f"extra.layers[{i}]"
        f.mapping(at, row)
        for key in ("weight", "macs_per_sample", "needs_input_grad", "weight_shape", "bias"):
            if key not in row:
                f.fail(at, row, f"an object with {key!r}")
        f.choice(f"{at}.weight", row["weight"], names, "a parameter name")
        if row["bias"] is not None:
            f.choice(f"{at}.bias", row["bias"], names, "null or a parameter name")
        f.number(f"{at}.macs_per_sample", row["macs_per_sample"], 0, float("inf"))
        f.boolean(f"{at}.needs_input_grad", row["needs_input_grad"])
        f.shape(f"{at}.weight_shape", row["weight_shape"], min_len=1)


def _check_portable_extra(f: _Fields, extra: Mapping, params: list[dict], buffers: list[dict]) -> None:
    masked = [p["name"] for p in params if p["masked"]]
    state = ([f"param::{p['name']}" for p in params] + [f"mask::{m}" for m in masked]
             + [f"buffer::{b['name']}" for b in buffers])
    for key in ("step_inputs", "step_outputs", "forward_inputs"):
        if key not in extra:
            f.fail("extra", sorted(extra), f"an object with {key!r} (the portable graphs' inputs and outputs)")
    if "channels" in extra:  # a channel-structured export: one index input per channel set
        state += [f"channels::{s}" for s in _check_channels(f, extra["channels"], params, buffers)]
    # The engine feeds and reads the step graph by these names: they must follow the parameter table.
    f.equal("extra.step_inputs", extra["step_inputs"], [*BATCH_INPUTS, *state])
    f.equal("extra.step_outputs", extra["step_outputs"],
            ["loss", "logits", *(f"grad::{p['name']}" for p in params if p["trainable"]),
             *(f"buffer_out::{b['name']}" for b in buffers)])
    f.equal("extra.forward_inputs", extra["forward_inputs"], ["x", *state])


def _check_channels(f: _Fields, channels, params: list[dict], buffers: list[dict]) -> list[str]:
    """extra.channels: {"sets": {name: channels}, "gathers": {tensor: [rows set|null, cols set|null, repeat]}},
    each gathered axis as long as its set (times repeat); returns the set names in order."""
    channels = f.mapping("extra.channels", channels, {"sets", "gathers"})
    sets = f.mapping("extra.channels.sets", channels["sets"])
    for name, size in sets.items():
        f.integer(f"extra.channels.sets[{name!r}]", size, 1)
    shapes = {t["name"]: t["shape"] for t in (*params, *buffers)}
    for name, g in f.mapping("extra.channels.gathers", channels["gathers"]).items():
        at = f"extra.channels.gathers[{name!r}]"
        if name not in shapes:
            f.fail(at, name, "the name of a parameter or buffer")
        if not (isinstance(g, list) and len(g) == 3 and all(s is None or s in sets for s in g[:2])):
            f.fail(at, g, f"[rows set or null, columns set or null, repeat], sets among {sorted(sets)}")
        repeat = f.integer(f"{at}[2]", g[2], 1)
        for axis, s in enumerate(g[:2]):
            want = None if s is None else sets[s] * (repeat if axis == 1 else 1)
            if want is not None and (len(shapes[name]) <= axis or shapes[name][axis] != want):
                f.fail(at, g, f"axes as long as their sets: {name!r} has shape {shapes[name]}")
    return list(sets)


ORT_EXTRA = ("train_inputs", "train_outputs", "eval_inputs", "eval_outputs", "param_graph_names", "mask_graph_names",
             "buffer_graph_names", "batchnorm", "optimizer_files", "adamw")


def _check_ort_training_extra(f: _Fields, extra: Mapping, params: list[dict], buffers: list[dict]) -> None:
    for key in ORT_EXTRA:
        if key not in extra:
            f.fail("extra", sorted(extra), f"an object with {key!r} (the ort-training graphs' details)")
    f.equal("extra.train_inputs", f.strings("extra.train_inputs", extra["train_inputs"]), list(BATCH_INPUTS))
    f.strings("extra.train_outputs", extra["train_outputs"])
    f.strings("extra.eval_inputs", extra["eval_inputs"])
    f.strings("extra.eval_outputs", extra["eval_outputs"])
    buffer_names = [b["name"] for b in buffers]
    for key, names in (("param_graph_names", [p["name"] for p in params]),
                       ("mask_graph_names", [p["name"] for p in params if p["masked"]]),
                       ("buffer_graph_names", buffer_names)):
        table = f.mapping(f"extra.{key}", extra[key], set(names))
        for name, graph in table.items():
            f.string(f"extra.{key}[{name!r}]", graph)
    if not isinstance(extra["batchnorm"], list):
        f.fail("extra.batchnorm", extra["batchnorm"], "a list of BatchNorm layer objects")
    for i, layer in enumerate(extra["batchnorm"]):
        at = f"extra.batchnorm[{i}]"
        f.mapping(at, layer, {"mean", "var", "momentum", "spatial"})
        for key in ("mean", "var"):
            f.choice(f"{at}.{key}", layer[key], buffer_names, "a buffer name")
            if f"updated::{layer[key]}" not in extra["train_outputs"]:
                f.fail("extra.train_outputs", extra["train_outputs"], f"a list holding 'updated::{layer[key]}'")
        f.number(f"{at}.momentum", layer["momentum"], 0.0, 1.0, low_open=True)
        f.integer(f"{at}.spatial", layer["spatial"], 1)
    optimizer_files = f.mapping("extra.optimizer_files", extra["optimizer_files"], {"sgd", "adamw"})
    for kind, name in optimizer_files.items():
        f.string(f"extra.optimizer_files[{kind!r}]", name)
    adamw = f.mapping("extra.adamw", extra["adamw"])
    for key in ("betas", "eps"):
        if key not in adamw:
            f.fail("extra.adamw", adamw, f"an object with {key!r}")
    betas = adamw["betas"]
    if not isinstance(betas, list) or len(betas) != 2:
        f.fail("extra.adamw.betas", betas, "a list of two numbers in [0, 1)")
    for i, beta in enumerate(betas):
        f.number(f"extra.adamw.betas[{i}]", beta, 0.0, 1.0)
    f.number("extra.adamw.eps", adamw["eps"], 0.0, 1.0, low_open=True)
