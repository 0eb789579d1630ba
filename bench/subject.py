"""What a bench command measures: a built-in model family, the user's own model, or the user's export.

- a built-in family: a name in MODEL_NAMES, built by `edgecl.exporters.models.build_model` from
  a seed, exported by bench into a cache folder for the ONNX engines;
- the user's model, `FILE.py:FUNCTION`: the function is called with no arguments after
  `torch.manual_seed(seed)` and returns an `nn.Module` taking (N, *input_shape) and returning
  (N, num_classes) logits; exported by bench into a cache folder like a built-in;
- the user's export, an artifact folder: benched as it is on the engine its manifest names,
  read only (nothing is written into it, nothing exported) and without torch, so it runs in a
  runtime-only environment too.

Only `build_net` and `cache_key` import torch (`build_net` runs the user's file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

# edgecl.exporters.models.MODELS (checked by a test)
MODEL_NAMES = ("mlp", "cnn", "cnn-s2", "resnet", "mobilenet", "resnet18", "mobilenetv2")
DEFAULT_MODEL = "cnn"
DEFAULT_SHAPE = (1, 8, 8)  # of the built-in families; a model file needs its own
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Subject:
    """The resolved subject of a measurement.

    model: a built-in name or `FILE.py:FUNCTION` as given; None for an artifact folder.
    label: what rows and tables call it (the model, or the artifact folder's name).
    artifacts: the user's export (read only), or None. engine: its manifest's engine, or None.
    """

    model: str | None
    label: str
    input_shape: tuple[int, ...]
    num_classes: int
    artifacts: Path | None = None
    engine: str | None = None

    @property
    def model_file(self) -> tuple[Path, str] | None:
        """(file, function) of a `FILE.py:FUNCTION` model, else None."""
        return None if self.model is None else split_model_file(self.model)

    @classmethod
    def of(cls, model, input_shape, num_classes: int, artifacts, engines) -> Subject:
        """The subject of a config whose fields `resolve_config_fields` set (no file is read)."""
        if artifacts is None:
            return cls(model, model, tuple(input_shape), num_classes)
        return cls(None, Path(artifacts).name, tuple(input_shape), num_classes, Path(artifacts), engines[0])


def split_model_file(model: str) -> tuple[Path, str] | None:
    """'nets/my.py:build' -> (Path('nets/my.py'), 'build'); a built-in name -> None.

    Raises:
        ValueError: a ':' in a text that is not FILE.py:FUNCTION.
    """
    if ":" not in model:
        return None
    file, function = model.rsplit(":", 1)
    if not file.endswith(".py") or not function.isidentifier():
        raise ValueError(f"model={model!r}; accepted: a built-in family ({', '.join(MODEL_NAMES)}) or FILE.py:FUNCTION "
                         "(a Python file and the name of a function in it returning an nn.Module)")
    return Path(file), function


def check_model(model) -> str:
    """A built-in family name, or FILE.py:FUNCTION naming an existing file (not run here).

    Raises:
        ValueError: naming the model and what is accepted.
    """
    if not isinstance(model, str):
        raise ValueError(f"model={model!r}; accepted: a built-in family ({', '.join(MODEL_NAMES)}) or FILE.py:FUNCTION")
    spec = split_model_file(model)
    if spec is None:
        if model not in MODEL_NAMES:
            raise ValueError(f"model {model!r} is unknown; accepted: {', '.join(MODEL_NAMES)} or FILE.py:FUNCTION")
    elif not spec[0].is_file():
        raise ValueError(f"model={model!r}: {str(spec[0])!r} is not a file; accepted: FILE.py:FUNCTION with an "
                         "existing Python file")
    return model


def check_shape(model: str, input_shape) -> tuple[int, ...]:
    """The shape of one sample as a tuple of positive ints; (C, H, W) with H, W >= 4 for the conv families.

    Raises:
        ValueError: an unknown model, or a shape the model cannot take.
    """
    check_model(model)
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape={input_shape!r}; accepted: a sequence of positive integers") from None
    if not shape or any(d < 1 for d in shape) or shape != tuple(input_shape):
        raise ValueError(f"input_shape={input_shape!r}; accepted: a sequence of positive integers")
    if model in MODEL_NAMES and model != "mlp" and (len(shape) != 3 or min(shape[1:]) < 4):
        raise ValueError(f"input_shape={shape} for {model!r}; accepted: (C, H, W) with H, W >= 4")
    return shape


def parse_shape(text: str) -> tuple[int, ...]:
    """'1x8x8' -> (1, 8, 8).

    Raises:
        ValueError: not positive integers joined by 'x'.
    """
    try:
        shape = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--input-shape {text!r}; accepted: positive integers joined by 'x', e.g. 1x8x8") from None
    if any(d < 1 for d in shape):
        raise ValueError(f"--input-shape {text!r}; accepted: positive integers joined by 'x', e.g. 1x8x8")
    return shape


def _check_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r}; accepted: an integer >= 2")
    return num_classes


def resolve_subject(model=None, input_shape=None, num_classes=None, artifacts=None) -> Subject:
    """What to measure, from a config's fields; None fields take the defaults (or the manifest's values).

    Args:
        model: a built-in name or FILE.py:FUNCTION (None: DEFAULT_MODEL, unless `artifacts`).
        input_shape: one sample (None: DEFAULT_SHAPE for a built-in; required for a model file).
        num_classes: logits width (None: NUM_CLASSES). artifacts: an exported folder to bench as it is.
    Raises:
        ValueError: a bad field, a model file without input_shape, or `artifacts` with a model, or with
            an input_shape / num_classes other than its manifest's (naming both fields).
        ArtifactError: `artifacts` is not a loadable export (its manifest or files).
    """
    if artifacts is None:
        model = check_model(DEFAULT_MODEL if model is None else model)
        if input_shape is None:
            if split_model_file(model) is not None:
                raise ValueError(f"model={model!r} with input_shape=None: a model file's input is not known; "
                                 "accepted: the input_shape (C, H, W) of one sample with it")
            input_shape = DEFAULT_SHAPE
        return Subject(model, model, check_shape(model, input_shape),
                       _check_classes(NUM_CLASSES if num_classes is None else num_classes))
    from edgecl.runtime.errors import ArtifactError
    from edgecl.runtime.manifest import load_manifest

    if model is not None:
        raise ValueError(f"model={model!r} with artifacts={str(artifacts)!r}: an export is benched as it is and its "
                         "manifest names the model; accepted: one of the two")
    try:
        manifest = load_manifest(artifacts)  # every file's sha256 checked: what is benched is what was exported
    except ArtifactError as e:  # the same error, naming the argument it came from
        raise type(e)(f"artifacts={str(artifacts)!r}: {e}") from e
    shape = tuple(manifest.input_shape)
    for field, given, kept in (("input_shape", input_shape, shape), ("num_classes", num_classes, manifest.num_classes)):
        if given is not None and (tuple(given) if isinstance(given, (tuple, list)) else given) != kept:
            raise ValueError(f"{field}={given!r} with artifacts={str(artifacts)!r}, exported for {kept!r}: the "
                             "manifest gives it; accepted: the manifest's value or none")
    return Subject(None, Path(artifacts).name, shape, manifest.num_classes, Path(artifacts), manifest.engine)


def resolve_engines(subject: Subject, engines, all_engines) -> tuple[str, ...] | None:
    """The engines to measure: `all_engines` by default, the export's own engine for an artifact folder.

    Returns None when `engines` is None and there is no artifact folder (the caller's default applies).
    Raises:
        ValueError: engines other than the export's own for an artifact folder (naming both fields).
    """
    if subject.artifacts is None:
        return None if engines is None else tuple(engines)
    if engines is None:
        return (subject.engine,)
    if tuple(engines) != (subject.engine,):
        raise ValueError(f"engines={list(engines)} with artifacts={str(subject.artifacts)!r}, a {subject.engine} "
                         f"export: it runs on its own engine only, without torch; accepted: engines "
                         f"[{subject.engine!r}] or none, or model FILE.py:FUNCTION to compare engines with torch eager")
    return tuple(engines)


def resolve_config_fields(config, default_engines) -> None:
    """Set a bench config's model, input_shape, num_classes and engines to their resolved values.

    For `LatencyConfig` and `MemoryConfig` (frozen dataclasses with those fields and `artifacts`),
    in their `__post_init__`; None engines become `default_engines` (an artifact folder: its own).
    Raises:
        as `resolve_subject` and `resolve_engines`.
    """
    subject = resolve_subject(config.model, config.input_shape, config.num_classes, config.artifacts)
    engines = resolve_engines(subject, config.engines, default_engines)
    resolved = {"model": subject.model, "input_shape": subject.input_shape, "num_classes": subject.num_classes,
                "engines": tuple(default_engines) if engines is None else engines,
                "artifacts": None if subject.artifacts is None else str(subject.artifacts)}
    for field, value in resolved.items():
        object.__setattr__(config, field, value)


def check_cache_dir(cache_dir, subject: Subject):
    """The folder bench keeps its exports in, checked before any work (nothing is created).

    Raises:
        ValueError: a cache folder with an artifact folder to bench (nothing is exported then), a
            cache folder that is an export or inside one (a user's export is benched with artifacts,
            never written into), or one that cannot be written.
    """
    from edgecl.runtime.files import check_output_dir
    from edgecl.runtime.manifest import MANIFEST_NAME

    if cache_dir is None:
        return None
    if subject.artifacts is not None:
        raise ValueError(f"cache_dir={str(cache_dir)!r} with artifacts={str(subject.artifacts)!r}: an export is "
                         "benched as it is, nothing is exported or kept; accepted: one of the two")
    path = Path(cache_dir).resolve()
    export = next((p for p in (path, *path.parents) if (p / MANIFEST_NAME).is_file()), None)
    if export is not None:
        where = "holds an export" if export == path else f"is inside the export {str(export)!r}"
        raise ValueError(f"cache_dir={str(cache_dir)!r} {where} ({MANIFEST_NAME}): bench writes its own exports "
                         "into a cache folder and never into a user's export; accepted: artifacts (an export, "
                         "benched as it is) or another folder for bench's exports")
    return check_output_dir(cache_dir, "cache_dir")


def build_net(subject: Subject, seed: int):
    """The torch model of a built-in family or a model file, with its initial weights from `seed` (host, torch).

    A model file runs here (its folder first on sys.path while it loads, as for `python FILE.py`).
    Raises:
        ValueError: no such function, one that needs arguments, returns no nn.Module, or a model whose
            output for (2, *input_shape) is not (2, num_classes) logits.
        UnsupportedModelError: a layer edgecl cannot train (naming it).
    """
    import torch

    from edgecl.exporters.models import build_model
    from edgecl.exporters.spec import check_logits, check_supported

    if subject.model is None:
        raise ValueError(f"artifacts={str(subject.artifacts)!r} hold no torch model; accepted: model (a built-in "
                         "family or FILE.py:FUNCTION) for the torch engine")
    spec = subject.model_file
    if spec is None:
        return build_model(subject.model, subject.input_shape, subject.num_classes, seed=seed)
    function = load_function(*spec, subject.model)
    torch.manual_seed(seed)
    net = function()
    if not isinstance(net, torch.nn.Module):
        raise ValueError(f"model={subject.model!r} returned {type(net).__name__}; accepted: a function returning a "
                         "torch.nn.Module")
    check_supported(net)
    try:
        classes = check_logits(net, torch.zeros(2, *subject.input_shape))
    except RuntimeError as e:  # a forward that does not fit the shape (torch's message says where)
        raise ValueError(f"input_shape={subject.input_shape} does not fit model={subject.model!r}: its forward "
                         f"raised {str(e).splitlines()[0]}; accepted: the shape of one sample it takes") from None
    if classes != subject.num_classes:
        raise ValueError(f"num_classes={subject.num_classes} but model={subject.model!r} returns {classes} logits; "
                         f"accepted: num_classes {classes}")
    return net.train()


def load_function(file: Path, function: str, model: str):
    """The function `function` of the Python file `file` (run as a module, its folder on sys.path meanwhile,
    writing no bytecode there).

    Raises:
        ValueError: the file has no such function, or it takes arguments without defaults.
    """
    import importlib.util
    import inspect

    module_spec = importlib.util.spec_from_file_location(f"edgecl_user_model_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    folder, bytecode = str(file.resolve().parent), sys.dont_write_bytecode
    sys.path.insert(0, folder)
    sys.dont_write_bytecode = True  # no __pycache__ left in the user's folder (nor of what the file imports)
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
        sys.dont_write_bytecode = bytecode
    found = getattr(module, function, None)
    if not callable(found):
        names = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and v.__module__ == module.__name__)
        raise ValueError(f"model={model!r}: {str(file)!r} has no function {function!r}; accepted: one of "
                         f"{', '.join(names) or '(no functions there)'}")
    required = [p.name for p in inspect.signature(found).parameters.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if required:
        raise ValueError(f"model={model!r}: {function}() needs argument(s) {', '.join(required)}; accepted: a "
                         "function callable with no arguments (give the input with input_shape and num_classes)")
    return found


def cache_key(subject: Subject, net, seed: int) -> str:
    """10 hex digits naming one export in a cache folder: the model (a built-in name, or a model file's bytes
    and function), its structure (`repr(net)`), input, classes, seed, and the exporter's fingerprint, so a
    changed file or a newer exporter never reuses an old export."""
    from edgecl.exporters.export import exporter_fingerprint

    spec = subject.model_file
    source = subject.model if spec is None else [hashlib.sha256(spec[0].read_bytes()).hexdigest(), spec[1]]
    key = json.dumps([source, repr(net), list(subject.input_shape), subject.num_classes, seed, exporter_fingerprint()])
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def cache_name(subject: Subject, net, seed: int) -> str:
    """The folder of one subject's exports inside a cache folder: readable, then the cache key."""
    spec = subject.model_file
    name = subject.model if spec is None else f"{spec[0].stem}.{spec[1]}"
    return f"{name}-{'x'.join(map(str, subject.input_shape))}-seed{seed}-{cache_key(subject, net, seed)}"
