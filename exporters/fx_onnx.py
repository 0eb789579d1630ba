"""A make_fx graph -> ONNX through the dynamo exporter's translator, without its re-traces.

`torch.onnx.export(graph_module, dynamo=True)` first re-traces the graph with
`torch.export` (functionalisation, symbolic shapes again) and then once more in
`run_decompositions`, whose table only decomposes the ops the ONNX registry does not
implement. On the ResNet-18 step graph those two re-traces took 33 of the export's 48 s
and changed only `squeeze.dims` into `prims.squeeze` (241 nodes) and the symbolic-size
arithmetic. Here `make_fx` applies that table in its own trace (`decomposition_table`),
the step is traced once more under `functionalize` only when it mutates a tensor
(`is_functional`), and `to_onnx` hands the graph to the same translation: an
`ExportedProgram` over it (all inputs user inputs, no parameters), the exporter's
type-promotion and assertion-removal passes, the translation, the exporter's version
conversion (which also drops unused nodes).

These are torch.onnx's private functions: torch is pinned (pyproject.toml), and every
graph the exporter writes goes through here, so a torch that moved them fails the tests.
"""

from __future__ import annotations

import functools

import onnx
import onnx_ir
import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ExportGraphSignature, InputKind, InputSpec, OutputKind, OutputSpec, TensorArgument,
)
from torch.onnx._internal._lazy_import import onnxscript_apis
from torch.onnx._internal.exporter import _core, _decomp, _fx_passes, _registration

from .backward_ops import decomposition_table as backward_decompositions
from .backward_ops import onnx_translations
from .train_batchnorm import onnx_translations as batchnorm_translations

aten = torch.ops.aten
TORCHLIB_OPSET = 18  # torch.onnx's own functions are written for opset 18; others are converted
# Ops the ONNX registry translates whole (BatchNormalization) that core ATen would split into
# element-wise ops once the ONNX table's decompositions produce them.
KEEP_WHOLE = (aten._native_batch_norm_legit_no_training.default,)


def _sym_numel(self):
    """`aten.sym_numel` (make_fx records it where a reshape infers a -1 over a symbolic size)."""
    from onnxscript import opset18 as op

    return op.Size(self)


@functools.cache
def onnx_registry(opset: int) -> _registration.ONNXRegistry:
    """torch.onnx's registry of ATen -> ONNX functions plus edgecl's translations."""
    registry = _registration.ONNXRegistry.from_torchlib(opset_version=max(opset, TORCHLIB_OPSET))
    for op, fn in {**onnx_translations(), **batchnorm_translations(), aten.sym_numel.default: _sym_numel}.items():
        registry.register_op(op, fn, is_complex=False)
    return registry


@functools.cache
def decomposition_table(opset: int) -> dict:
    """edgecl's make_fx table (core ATen + `backward_ops`) plus the decompositions torch.onnx
    applies to whatever its registry cannot translate."""
    registry = onnx_registry(opset)
    onnx_table = _decomp.create_onnx_friendly_decomposition_table(set(_decomp.get_onnx_implemented_overloads(registry)))
    table = {**onnx_table, **backward_decompositions()}
    for op in KEEP_WHOLE:
        table.pop(op, None)
    return table


def is_functional(gm: torch.fx.GraphModule) -> bool:
    """No node mutates a tensor (a user's `out += x` traces to aten.add_, which ONNX cannot express)."""
    return not any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                   and n.target._schema.is_mutable for n in gm.graph.nodes)


def to_onnx(gm: torch.fx.GraphModule, opset: int) -> onnx.ModelProto:
    """Translate a functional make_fx graph (tensor inputs and outputs only) to an ONNX model.

    Raises:
        torch.onnx.errors.ConversionError (a subclass of RuntimeError): an op the registry cannot translate.
    """
    gm.graph.eliminate_dead_code()
    out = next(n for n in gm.graph.nodes if n.op == "output")
    if not isinstance(out.args[0], (tuple, list)):
        out.args = ((out.args[0],),)
    gm.recompile()
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    signature = ExportGraphSignature(
        input_specs=[InputSpec(InputKind.USER_INPUT, TensorArgument(n.name), None) for n in inputs],
        output_specs=[OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(n.name), None) for n in out.args[0]])
    program = ExportedProgram(gm, gm.graph, signature, state_dict={}, range_constraints={}, module_call_graph=[],
                              verifiers=[])
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):  # as torch.onnx's own passes
        _fx_passes.insert_type_promotion_nodes(program.graph_module)
        _fx_passes.remove_assertion_nodes(program.graph_module)
    model = _core._exported_program_to_onnx_program(program, registry=onnx_registry(opset)).model
    model = onnxscript_apis.convert_version(model, opset)
    return onnx_ir.serde.serialize_model(model)
