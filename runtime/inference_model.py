"""`export_inference`: a trained engine -> one self-contained ONNX inference model an app runs.

The model is the engine's own evaluation graph (`forward.onnx` of the portable engine,
`eval_model.onnx` of the ort-training engine) with every state input turned into a constant
that holds the value the engine holds now: weights, BatchNorm running statistics and, for a
channel-structured export, the active channel indices (int64 initializers). Its only input is
`x` (N, *input_shape) float32; its outputs are `logits` (N, classes) and `probabilities`, their
softmax over the classes. A latent-replay engine (`LatentReplay`) after its freeze gives one
model too: the frozen prefix, then the trained suffix; before the freeze, the full engine's model.

Masks are baked in: a masked weight is stored as weight * mask (exact zeros where the mask is 0),
and the graph's `mask::<name>` input becomes `ConstantOfShape(1.0)`, so the graph's own
`weight * mask` multiplies by one and ONNX Runtime folds it away at load. Keeping the masks as
initializers instead would double the file for every masked tensor (two float32 tensors of one
shape) to carry a product the weights already hold; deleting the multiplications instead would
mean rewriting each graph's own pattern (the channel-structured graph gathers the mask first).

The file is written here at the protobuf wire level (`onnx_wire`), without torch or the `onnx`
package: every field this module does not edit is copied verbatim. It is checked by loading it
into ONNX Runtime before it is written, atomically (`files.write_atomic`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from . import onnx_wire as w
from .errors import ArtifactError, UnsupportedModelError
from .files import prepare_output, write_atomic
from .latent import PREFIX_FILE, LatentReplay
from .ort_training import OrtTrainingEngine
from .portable import PortableEngine
from .session import ort

MAX_MODEL_BYTES = 2**31 - 1  # protobuf parses no message longer (ONNX Runtime, onnx); no external data here
INPUT, LOGITS, PROBABILITIES = "x", "logits", "probabilities"
PREFIX_SCOPE = "prefix/"  # the names of a latent-replay prefix inside the combined graph
# ModelProto / GraphProto / NodeProto / ValueInfoProto / TensorProto / AttributeProto field numbers
MODEL_GRAPH, MODEL_OPSET, MODEL_METADATA = 7, 8, 14
GRAPH_NODE, GRAPH_INIT, GRAPH_INPUT, GRAPH_OUTPUT, GRAPH_VALUE_INFO = 1, 5, 11, 12, 13
NODE_INPUT, NODE_OUTPUT, NODE_NAME, NODE_ATTRIBUTE = 1, 2, 3, 5
VALUE_NAME, VALUE_TYPE, TENSOR_NAME = 1, 2, 8
ATTRIBUTE_GRAPH, ATTRIBUTE_GRAPHS = 6, 11
ELEM_TYPES = {np.dtype(np.float32): w.FLOAT, np.dtype(np.int64): w.INT64}


@dataclasses.dataclass
class _Part:
    """One evaluation graph and what to bind to its inputs.

    values: graph input name -> the array it becomes (masked weights already multiplied by their
    mask). ones: graph input names of masks -> their shape (they become ConstantOfShape(1.0)).
    """

    folder: Path
    file: str
    sha256: str | None
    values: dict[str, np.ndarray]
    ones: dict[str, tuple[int, ...]]

    @property
    def source(self) -> str:
        return repr(str(self.folder / self.file))


@dataclasses.dataclass
class _Graph:
    """A GraphProto cut into the fields edited here: nodes (NodeProto payloads), inputs, outputs,
    value_info and initializers as (name, payload), and `other`, every other field as read."""

    nodes: list
    inputs: list
    outputs: list
    value_info: list
    initializers: list
    other: list

    @classmethod
    def read(cls, payload) -> _Graph:
        g = cls([], [], [], [], [], [])
        named = {GRAPH_INPUT: (g.inputs, VALUE_NAME), GRAPH_OUTPUT: (g.outputs, VALUE_NAME),
                 GRAPH_VALUE_INFO: (g.value_info, VALUE_NAME), GRAPH_INIT: (g.initializers, TENSOR_NAME)}
        for f in w.read_fields(payload):
            if f.wire_type == w.LEN and f.number == GRAPH_NODE:
                g.nodes.append(f.value)
            elif f.wire_type == w.LEN and f.number in named:
                into, name_field = named[f.number]
                names = w.strings(w.read_fields(f.value), name_field)
                into.append((names[-1] if names else "", f.value))
            else:
                g.other.append(f.raw)
        return g

    def write(self) -> list:
        """The graph's fields as chunks of bytes, payloads uncopied (joined once, by the caller)."""
        out = []
        for payload in self.nodes:
            out += [w.len_header(GRAPH_NODE, len(payload)), payload]
        out += self.other
        for number, items in ((GRAPH_INPUT, self.inputs), (GRAPH_OUTPUT, self.outputs),
                              (GRAPH_VALUE_INFO, self.value_info), (GRAPH_INIT, self.initializers)):
            for _, payload in items:
                out += [w.len_header(number, len(payload)), payload]
        return out

    def names(self) -> set[str]:
        """Every value name the graph uses (node inputs and outputs, inputs, outputs, initializers)."""
        names = {n for items in (self.inputs, self.outputs, self.initializers) for n, _ in items}
        for node in self.nodes:
            fields = w.read_fields(node)
            names.update(w.strings(fields, NODE_INPUT) + w.strings(fields, NODE_OUTPUT))
        return names


def export_inference(engine, path: str | Path) -> Path:
    """Write the engine's current model as a self-contained ONNX inference model (see the module docstring).

    Args:
        engine: a PortableEngine or OrtTrainingEngine (`open_engine`), or a LatentReplay.
        path: the file to write, ending in ".onnx" (a missing folder is created; an existing file
            is replaced whole, atomically).
    Returns:
        The path written. Inputs: `x` float32 (N, *input_shape); outputs: `logits` float32
        (N, num_classes) as `engine.evaluate` returns them, and `probabilities`, their softmax.
    Raises:
        TypeError: `engine` is of another kind, or `path` is not a str / Path.
        ValueError: a bad path (suffix, a folder, not writable), or the suffix engine of a
            latent-replay export on its own (pass the LatentReplay that holds its prefix).
        UnsupportedModelError: a model of more than 2 GiB (protobuf's limit), or graphs that cannot be
            combined. ArtifactError: a graph file altered since export, or one that does not fit the
            engine's state. Nothing is written then.
    """
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path is a {type(path).__name__}; accepted: a str or pathlib.Path of a .onnx file")
    parts = _parts(engine)
    path = prepare_output(path, (".onnx",))
    _check_size(sum(v.nbytes for part in parts for v in part.values.values()), "at least ")  # before any copy
    models = [_bound_graph(part, PREFIX_SCOPE if i < len(parts) - 1 else "") for i, part in enumerate(parts)]
    model_fields = models[-1][0]
    if any(_opsets(fields) != _opsets(model_fields) for fields, _ in models):
        raise UnsupportedModelError(f"{parts[0].source} and {parts[-1].source} import other opsets; accepted: "
                                    "graphs of one export (one opset)")
    graph = _chain([g for _, g in models]) if len(models) > 1 else models[0][1]
    _add_probabilities(graph, parts[-1].source)
    data = _model_bytes(model_fields, graph, {"edgecl.engine": engine.name,
                                              "edgecl.steps_done": str(_steps_done(engine))})
    models = graph = None  # their bytes are in `data`: not held while ONNX Runtime loads a copy
    _check_size(len(data))
    _check_loads(data, parts[-1].source)
    return write_atomic(path, data)


def _check_size(size: int, bound: str = "") -> None:
    if size > MAX_MODEL_BYTES:
        raise UnsupportedModelError(f"the inference model would be {bound}{size} bytes; accepted: at most "
                                    f"{MAX_MODEL_BYTES} (protobuf's 2 GiB limit; edgecl writes no external data)")


def _parts(engine) -> list[_Part]:
    """The graphs of `engine` in order (prefix first), each with the values of its inputs."""
    if isinstance(engine, LatentReplay):
        if not engine.frozen:
            return _parts(engine.full)
        suffix = engine.suffix
        files = suffix.manifest.files
        prefix = _Part(suffix.artifact_dir, PREFIX_FILE, files[PREFIX_FILE].sha256 if PREFIX_FILE in files else None,
                       engine.prefix.state(), {})
        return [prefix, _engine_part(suffix)]
    if isinstance(engine, PortableEngine) and "latent" in engine.manifest.extra:
        raise ValueError(f"engine of {str(engine.artifact_dir)!r} trains the part of a latent-replay export after "
                         f"split {engine.manifest.extra['latent'].get('split')!r} (its input is the latent); "
                         "accepted: the LatentReplay that holds its prefix")
    return [_engine_part(engine)]


def _engine_part(engine) -> _Part:
    if isinstance(engine, PortableEngine):
        masks = engine.masks()
        values = {f"param::{n}": _masked(v, masks.get(n)) for n, v in engine.parameters().items()}
        values.update({f"buffer::{n}": v for n, v in engine.buffers().items()})
        values.update({f"channels::{s}": v.astype(np.int64) for s, v in engine.channels().items()})
        ones = {f"mask::{n}": m.shape for n, m in masks.items()}
        file = "forward.onnx"
    elif isinstance(engine, OrtTrainingEngine):
        extra, masks = engine.manifest.extra, engine.masks()
        param_names, mask_names = extra["param_graph_names"], extra["mask_graph_names"]
        values = {param_names[n]: _masked(v, masks.get(n)) for n, v in engine.parameters().items()}
        values.update({extra["buffer_graph_names"][n]: v for n, v in engine.buffers().items()})
        ones = {mask_names[n]: m.shape for n, m in masks.items()}
        file = "eval_model.onnx"
    else:
        raise TypeError(f"engine is a {type(engine).__name__}; accepted: a PortableEngine or OrtTrainingEngine "
                        "(open_engine), or a LatentReplay")
    entry = engine.manifest.files.get(file)
    return _Part(Path(engine.artifact_dir), file, entry.sha256 if entry else None, values, ones)


def _masked(weight: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """weight (the engine's copy) * mask, in place: exactly 0 where the mask is 0 (the engines keep it
    so; this does not rely on it)."""
    if mask is not None:
        weight[mask == 0] = 0
    return weight


def _steps_done(engine) -> int:
    return engine.active.steps_done if isinstance(engine, LatentReplay) else engine.steps_done


def _read_file(part: _Part) -> bytes:
    """The graph file's bytes, once its sha256 is the one of the manifest the engine was opened from."""
    try:
        data = (part.folder / part.file).read_bytes()
    except OSError as e:
        raise ArtifactError(f"cannot read {part.source}: {e.strerror or e}") from e
    if part.sha256 is None or hashlib.sha256(data).hexdigest() != part.sha256:
        raise ArtifactError(f"{part.source} is not the file the engine's manifest lists (sha256 differs or it is "
                            "not listed): it was altered since export; export again")
    return data


def _bound_graph(part: _Part, scope: str) -> tuple[list, _Graph]:
    """(the ModelProto's fields, its graph with every input but `x` bound to the part's values);
    a `scope` ("prefix/"): every name but `x` gets it (a latent-replay prefix, chained before a suffix)."""
    fields = w.read_fields(_read_file(part))
    graph_fields = [f for f in fields if f.number == MODEL_GRAPH and f.wire_type == w.LEN]
    if len(graph_fields) != 1:
        raise ArtifactError(f"{part.source} holds {len(graph_fields)} graphs; accepted: an ONNX model with one")
    graph = _Graph.read(graph_fields[0].value)
    values, ones = part.values, part.ones
    if scope:
        def scoped(name):
            return name if name in ("", INPUT) else scope + name

        _rename(graph, scoped, part.source)
        values = {scoped(k): v for k, v in values.items()}
        ones = {scoped(k): v for k, v in ones.items()}
    _bind(graph, values, ones, part.source)
    part.values = None  # the graph holds their bytes now
    return fields, graph


def _bind(graph: _Graph, values: dict[str, np.ndarray], ones: dict[str, tuple], source: str) -> None:
    """Turn every graph input but `x` into a constant: `values` -> initializers, `ones` (mask name ->
    shape) -> ConstantOfShape(1.0) nodes; by name, whatever the order of the graph's inputs."""
    inputs = dict(graph.inputs)
    fed = values.keys() | ones.keys()
    unfed = [n for n in inputs if n != INPUT and n not in fed]
    unknown = sorted(fed - inputs.keys())
    if INPUT not in inputs or unfed or unknown:
        raise ArtifactError(f"{source} does not fit the engine's state: graph inputs {sorted(inputs)}; missing "
                            f"from the graph: {unknown}; not in the engine's state: {unfed} (accepted: input "
                            f"{INPUT!r} and one input per parameter, mask, buffer and channel set)")
    taken = graph.names()
    new_nodes, new_inits = [], []
    for name in sorted(fed):
        value = values.get(name)
        if value is not None:
            _check_value(name, value.dtype, value.shape, inputs[name], source)
            new_inits.append((name, w.tensor(name, value)))
            continue
        _check_value(name, np.dtype(np.float32), ones[name], inputs[name], source)
        shape_name = f"{name}::shape"
        if shape_name in taken:
            raise UnsupportedModelError(f"{source} already has a value {shape_name!r}; accepted: graphs "
                                        "without it (the name of a mask's shape here)")
        new_inits.append((shape_name, w.tensor(shape_name, np.array(ones[name], np.int64))))
        one = w.attribute_tensor("value", w.tensor("", np.ones(1, np.float32)))
        new_nodes.append(w.node("ConstantOfShape", [shape_name], [name], f"{name}::ones", [one]))
    graph.inputs = [(n, vi) for n, vi in graph.inputs if n == INPUT]
    graph.value_info = [(n, vi) for n, vi in graph.value_info if n not in fed]
    graph.initializers += new_inits
    graph.nodes = new_nodes + graph.nodes


def _check_value(name: str, dtype: np.dtype, shape: tuple, value_info, source: str) -> None:
    """The engine's array has the element type and every fixed dimension the graph declares for it."""
    elem, dims = w.tensor_type(dict((f.number, f.value) for f in w.read_fields(value_info)).get(VALUE_TYPE, b""))
    fits = ELEM_TYPES.get(np.dtype(dtype)) == elem and (
        dims is None or (len(dims) == len(shape) and all(not isinstance(d, int) or d == s
                                                         for d, s in zip(dims, shape))))
    if not fits:
        raise ArtifactError(f"{source} declares input {name!r} as element type {elem}, dims {dims}; the engine "
                            f"holds {np.dtype(dtype)} {tuple(shape)}: the graph does not fit the engine's state")


def _rename(graph: _Graph, rename, source: str) -> None:
    """Rename every value (node inputs and outputs, graph inputs, outputs, value_info, initializers)
    and node name by `rename`; other fields are kept as read."""
    def renamed(payload, name_fields, node=False):
        out = []
        for f in w.read_fields(payload):
            if f.wire_type == w.LEN and f.number in name_fields:
                out.append(w.len_field(f.number, rename(f.text)))
                continue
            if node and f.wire_type == w.LEN and f.number == NODE_ATTRIBUTE and any(
                    a.number in (ATTRIBUTE_GRAPH, ATTRIBUTE_GRAPHS) for a in w.read_fields(f.value)):
                raise UnsupportedModelError(f"{source} has a node with a subgraph (If, Loop, Scan); accepted: "
                                            "graphs without subgraphs, whose names can be scoped")
            out.append(bytes(f.raw))
        return b"".join(out)

    graph.nodes = [renamed(n, (NODE_INPUT, NODE_OUTPUT, NODE_NAME), node=True) for n in graph.nodes]
    for attr, field in (("inputs", VALUE_NAME), ("outputs", VALUE_NAME), ("value_info", VALUE_NAME),
                        ("initializers", TENSOR_NAME)):
        setattr(graph, attr, [(rename(n), renamed(p, (field,))) for n, p in getattr(graph, attr)])


def _chain(graphs: list[_Graph]) -> _Graph:
    """prefix then suffix: the prefix's one output feeds the suffix's input `x`."""
    prefix, suffix = graphs
    latent = [n for n, _ in prefix.outputs]
    if len(latent) != 1:
        raise UnsupportedModelError(f"the latent-replay prefix has outputs {latent}; accepted: one (the latent)")
    clash = sorted(n for n in suffix.names() if n.startswith(PREFIX_SCOPE))
    if clash:
        raise UnsupportedModelError(f"the suffix graph has values {clash[:3]} in the prefix's scope "
                                    f"{PREFIX_SCOPE!r}; accepted: graphs without such names")
    _rename(suffix, lambda n: latent[0] if n == INPUT else n, "the suffix graph")
    return _Graph(prefix.nodes + suffix.nodes, prefix.inputs, suffix.outputs, prefix.value_info + suffix.value_info,
                  prefix.initializers + suffix.initializers, suffix.other)


def _add_probabilities(graph: _Graph, source: str) -> None:
    """A second output, `probabilities` = Softmax(logits, axis=1), of the same type as `logits`."""
    outputs = dict(graph.outputs)
    if LOGITS not in outputs:
        raise ArtifactError(f"{source} has outputs {sorted(outputs)}; accepted: a graph with output {LOGITS!r}")
    if PROBABILITIES in graph.names():
        raise UnsupportedModelError(f"{source} already has a value {PROBABILITIES!r}; accepted: graphs without it")
    graph.nodes.append(w.node("Softmax", [LOGITS], [PROBABILITIES], PROBABILITIES, [w.attribute_int("axis", 1)]))
    logits_type = [f.raw for f in w.read_fields(outputs[LOGITS]) if f.number == VALUE_TYPE]
    graph.outputs.append((PROBABILITIES, w.len_field(VALUE_NAME, PROBABILITIES) + b"".join(map(bytes, logits_type))))


def _opsets(model_fields) -> list[bytes]:
    return sorted(bytes(f.raw) for f in model_fields if f.number == MODEL_OPSET)


def _model_bytes(model_fields, graph: _Graph, metadata: dict[str, str]) -> bytes:
    """The ModelProto: its fields as read, the new graph in place of the old, `metadata` in metadata_props
    (replacing entries of the same keys)."""
    def key_of(f):
        return w.strings(w.read_fields(f.value), 1)

    chunks = []
    for f in model_fields:
        if f.number == MODEL_GRAPH:
            graph_chunks = graph.write()
            chunks += [w.len_header(MODEL_GRAPH, sum(len(c) for c in graph_chunks)), *graph_chunks]
        elif f.number == MODEL_METADATA and f.wire_type == w.LEN and set(key_of(f)) & metadata.keys():
            continue
        else:
            chunks.append(bytes(f.raw))
    chunks += [w.len_field(MODEL_METADATA, w.len_field(1, k) + w.len_field(2, v)) for k, v in metadata.items()]
    return b"".join(chunks)


def _check_loads(data: bytes, source: str) -> None:
    """ONNX Runtime loads the model (graph checks and shape inference; no optimization, nothing run)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail / InvalidGraph types
        raise ArtifactError(f"onnxruntime {ort.__version__} refuses the inference model built from {source}: "
                            f"{e}") from e
